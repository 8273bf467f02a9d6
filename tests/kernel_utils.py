"""Helpers shared by the kernel tests (tests/test_kernel_*.py) and tests/bench_kernels.py.

Import this module before triton: without CUDA it turns the Triton interpreter on (the kernels then take CPU tensors).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if ON_GPU else "cpu"

# (rtol, atol) per dtype for float outputs compared with the torch reference
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16 tl.dot and large shapes)")

# fp32 and fp16 everywhere; bf16 only on a GPU (the interpreter's bf16 tl.dot is wrong)
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)]


def assert_close(actual, expected, dtype=None):
    rtol, atol = TOLERANCE[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


POISON_FLOAT = float("nan")
POISON_INT = -7


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(POISON_FLOAT)
    elif t.dtype != torch.bool:
        t.fill_(POISON_INT)
    return t


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty / empty_like made inside comes back filled with NaN (floats) or -7 (ints), so an output or
    workspace element a kernel forgets to write shows up in the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned_empty(*args, **kwargs):
        return _poison(empty(*args, **kwargs))

    def poisoned_empty_like(*args, **kwargs):
        return _poison(empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = poisoned_empty, poisoned_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, gen: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Random normal on the CPU generator (same numbers on every machine), then moved to DEVICE."""
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def gguf_weight(k: int, n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """fp32 [k, n] as a GGUF reader dequantises random blocks of 32 along k: Q4_1 ``d * q + m`` (multiply, then
    add), Q8_0 ``d * q``, with fp16 d and m, and each block's extremes present as quantisers leave them."""
    blocks = k // 32
    d = (torch.rand(blocks, n, generator=gen) * 0.02 + 1e-4).half().float().repeat_interleave(32, 0)
    if kind == "q4":
        q = torch.randint(0, 16, (k, n), generator=gen).float()
        q.view(blocks, 32, n)[:, 5], q.view(blocks, 32, n)[:, 17] = 0, 15
        w = d * q
        return w + (torch.randn(blocks, n, generator=gen) * 0.1).half().float().repeat_interleave(32, 0)
    q = torch.randint(-127, 128, (k, n), generator=gen).float()
    q.view(blocks, 32, n)[:, 9] = -127
    return d * q
