"""Which implementation the hot path uses: ``torch`` (references, the CPU default) or ``triton`` (kernels)."""
from __future__ import annotations

import os

_BACKEND = os.environ.get("FLEXDRAFT_BACKEND", "torch")
BACKENDS = ("torch", "triton")


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def use_triton() -> bool:
    return _BACKEND == "triton"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels take CPU tensors and autotuning cannot run."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(device) -> None:
    """Fail with a clear message where a Triton launch cannot work: CPU tensors need the interpreter, and the
    interpreter needs TRITON_INTERPRET=1 from before triton was imported (it decorates tl.max & co. at import)."""
    import torch
    if torch.device(device).type != "cpu":
        return
    import triton.language as tl
    if not interpreting() or type(tl.standard.max).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton kernels got CPU tensors but triton is not interpreting: set TRITON_INTERPRET=1 "
                           "before triton is first imported (importing `kernels` first does it on a machine without "
                           "CUDA), or use the torch backend")


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): how many programs fill the machine."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


_SM_COUNT: dict[int, int] = {}


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has native bf16 GEMMs (oneDNN's check: AVX512-BF16/AMX, or AVX512 emulation). Without them
    (an AVX2-only CPU) PyTorch falls back to a scalar bf16 GEMM ~400x slower than fp32 (measured: 0.27 vs 109 GFLOP/s
    on a 2048^3 product), so the CPU paths that pick bf16 for speed ask this first."""
    global _CPU_BF16_FAST
    if _CPU_BF16_FAST is None:
        import torch
        try:
            _CPU_BF16_FAST = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _CPU_BF16_FAST = False
    return _CPU_BF16_FAST


_CPU_BF16_FAST: bool | None = None
