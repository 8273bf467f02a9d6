"""Launch configurations for the Triton kernels: per-kernel search spaces, a per-device JSON store, and the sweep
that fills it on a GPU (``autotune.sweep.run_sweep``). Kernels read the store through ``autotune.store.lookup``."""
import kernels  # noqa: F401  (first: without a GPU it turns the Triton interpreter on before triton is imported)
