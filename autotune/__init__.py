"""Launch configurations for the Triton kernels: per-kernel search spaces, a per-device JSON store, and the sweep
that fills it on a GPU (``run_sweep``). Kernels read the store through ``autotune.store.lookup``."""
