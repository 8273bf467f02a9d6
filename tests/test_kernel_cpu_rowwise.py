"""kernels.cpu_rowwise (RMSNorm, residual add + RMSNorm, RoPE and the KV-cache write in C, for fp32 decode steps on
a CPU) against their torch references."""
from __future__ import annotations

import pytest
import torch
from kernel_utils import poisoned_allocations, seeded

from kernels import cpu_matmul, cpu_rowwise
from kernels.cpu_build import Library

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason=f"the CPU kernels are unavailable here: "
                                  f"{cpu_matmul.why_unavailable()}")


def scaled_rows(shape, gen):
    """Rows at the residual stream's scale (norms of hundreds), with a spread of magnitudes across rows."""
    return torch.randn(*shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen) * 40


@needs_kernel
@pytest.mark.parametrize("k", [1, 15, 16, 17, 64, 100, 576])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), (1, 13, 4)])
def test_rms_norm_matches_the_reference_at_odd_shapes(lead, k):
    """Odd widths (a partial last group of 16, fewer than 16), any leading dims; outputs poisoned."""
    gen = seeded(k * 31 + len(lead))
    x, w = scaled_rows((*lead, k), gen), torch.randn(k, generator=gen)
    assert cpu_rowwise.takes_c_path(x, w)
    with poisoned_allocations():
        out = cpu_rowwise.rms_norm(x, w, 1e-5)
        total, normed = cpu_rowwise.add_rms_norm(x, x.flip(-1), w, 1e-6)
    torch.testing.assert_close(out, cpu_rowwise.rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    expected_total, expected = cpu_rowwise.add_rms_norm_reference(x, x.flip(-1), w, 1e-6)
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_rms_norm_of_a_row_does_not_depend_on_the_rows_beside_it():
    """A verify row gets exactly the numbers an autoregressive row gets: one row alone, or among others, or read
    through a non-contiguous view, gives the same bits."""
    gen = seeded(5)
    x, w = scaled_rows((9, 576), gen), torch.randn(576, generator=gen)
    together = cpu_rowwise.rms_norm(x, w, 1e-5)
    assert all(torch.equal(cpu_rowwise.rms_norm(x[i:i + 1], w, 1e-5), together[i:i + 1]) for i in range(9))
    wide = torch.cat([x, x], dim=-1)[:, :576]
    assert not wide.is_contiguous() and torch.equal(cpu_rowwise.rms_norm(wide, w, 1e-5), together)


@needs_kernel
@pytest.mark.parametrize("count", [1, 5, 12])
@pytest.mark.parametrize("d", [2, 8, 64, 66])
@pytest.mark.parametrize("b,t", [(1, 1), (3, 7)])
def test_rope_gives_the_references_bits(b, t, d, count):
    """The same multiplies and adds as the reference (no FMA contraction): equal bits; outputs poisoned."""
    gen = seeded(b * 100 + t * 10 + d + count)
    heads = torch.randn(b, t, count + 3, d, generator=gen) * 7
    cos, sin = torch.randn(b, t, 1, d, generator=gen), torch.randn(b, t, 1, d, generator=gen)
    with poisoned_allocations():
        out = cpu_rowwise.rope(heads, count, cos, sin)
    assert out.shape == (b, t, count, d)
    assert torch.equal(out, cpu_rowwise.rope_reference(heads, count, cos, sin))


@needs_kernel
@pytest.mark.parametrize("b,t,h,d", [(1, 1, 3, 64), (3, 5, 2, 8), (2, 9, 1, 16)])
def test_write_kv_writes_what_the_reference_writes_and_nothing_else(b, t, h, d):
    """k and v are views into the projected heads (strided rows, contiguous heads), slots ragged per sequence; the
    caches are filled with a sentinel first, so a stray write or a missed one shows."""
    gen = seeded(b + t + h + d)
    heads = torch.randn(b, t, 3 * h, d, generator=gen)
    k, v = heads[:, :, h:2 * h], heads[:, :, 2 * h:]
    slots = torch.stack([torch.randperm(24, generator=gen)[:t] for _ in range(b)])
    caches, expected = torch.full((2, b, h, 24, d), -3.0), torch.full((2, b, h, 24, d), -3.0)
    cpu_rowwise.write_kv(caches[0], caches[1], k, v, slots)
    cpu_rowwise.write_kv_reference(expected[0], expected[1], k, v, slots)
    assert torch.equal(caches, expected)
    layered = torch.full((2, 4, b, h, 24, d), -3.0)   # the model's caches: one layer of [layers, B, H, S, D] each
    cpu_rowwise.write_kv(layered[0, 2], layered[1, 2], k, v, slots)
    assert torch.equal(layered[:, 2], expected) and bool((layered[:, [0, 1, 3]] == -3.0).all())


@needs_kernel
def test_a_cache_slot_outside_the_cache_raises_and_writes_nothing():
    caches = torch.zeros(2, 1, 2, 8, 16)
    k, v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    with pytest.raises(IndexError, match="outside 0..7"):
        cpu_rowwise.write_kv(caches[0], caches[1], k, v, torch.tensor([[3, 8]]))
    with pytest.raises(IndexError):
        cpu_rowwise.write_kv(caches[0], caches[1], k, v, torch.tensor([[-1, 2]]))
    assert bool((caches == 0).all())


def test_training_and_other_dtypes_take_the_references(monkeypatch):
    """What autograd tracks, bf16, and everything when the CPU kernels are off go to torch, with the same results
    and gradients flowing."""
    gen = seeded(9)
    x, w = scaled_rows((2, 32), gen).requires_grad_(), torch.randn(32, generator=gen)
    assert not cpu_rowwise.takes_c_path(x, w)
    cpu_rowwise.rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert not cpu_rowwise.takes_c_path(x.detach().bfloat16(), w)
    with torch.no_grad():
        assert cpu_rowwise.takes_c_path(x, w) == cpu_matmul.available()
    monkeypatch.setattr(cpu_matmul, "ISA", None)
    monkeypatch.setattr(cpu_matmul, "_WHY_NOT", None)
    monkeypatch.setenv("FLEXDRAFT_CPU_MATMUL", "0")
    assert not cpu_rowwise.takes_c_path(x.detach(), w)
    torch.testing.assert_close(cpu_rowwise.rms_norm(x.detach(), w, 1e-5),
                               cpu_rowwise.rms_norm_reference(x.detach(), w, 1e-5))


def test_a_failed_build_leaves_the_references_running(monkeypatch):
    """A compiler that fails on this library (not on the packed matmul's) is remembered, and the model's ops go to
    torch rather than raising mid-forward."""
    def broken(*_args):
        raise RuntimeError("cc failed: test")
    monkeypatch.setattr(cpu_rowwise, "LIBRARY", Library(cpu_rowwise._build))
    monkeypatch.setattr(cpu_rowwise, "compile_library", broken)
    x, w = torch.randn(2, 32), torch.randn(32)
    assert not cpu_rowwise.takes_c_path(x, w)
    if cpu_matmul.available():
        assert cpu_rowwise.LIBRARY.why_not == "cc failed: test"
    torch.testing.assert_close(cpu_rowwise.rms_norm(x, w, 1e-5), cpu_rowwise.rms_norm_reference(x, w, 1e-5))
