"""verify_greedy_triton / verify_sampling_triton against the references: integers, so exact equality."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_utils import DEVICE, gpu_only, poisoned_allocations, seeded  # noqa: E402

from kernels import backend  # noqa: E402
from kernels.verify import (verify_greedy, verify_greedy_reference, verify_greedy_triton,  # noqa: E402
                            verify_sampling, verify_sampling_launch, verify_sampling_reference,
                            verify_sampling_triton)

SMALL = {"BLOCK_V": 32, "num_warps": 4}   # several vocab tiles, the last one partial


def assert_same(out, ref):
    for name, a, b in zip(("tokens", "accept_len", "new_kv_len"), out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"


def greedy_inputs(batch, n, seed, match=0.8, argmax_dtype=torch.int64, kv_dtype=torch.int64):
    gen = seeded(seed)
    target = torch.randint(0, 50, (batch, n + 1), generator=gen)
    drafts = torch.where(torch.rand(batch, n, generator=gen) < match, target[:, :n],
                         torch.randint(0, 50, (batch, n), generator=gen))
    num_drafts = torch.randint(1, n + 1, (batch,), generator=gen)
    num_drafts[0] = n   # one row may accept everything, bonus from the last position
    drafts[0] = target[0, :n]
    kv_len = torch.randint(0, 500, (batch,), generator=gen)
    return (drafts.to(DEVICE), num_drafts.to(DEVICE), target.to(DEVICE, argmax_dtype), kv_len.to(DEVICE, kv_dtype))


@pytest.mark.parametrize("batch,n", [(1, 1), (9, 5), (17, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy(batch, n, seed):
    args = greedy_inputs(batch, n, seed)
    with poisoned_allocations():
        out = verify_greedy_triton(*args)
    assert_same(out, verify_greedy_reference(*args))


def test_greedy_int32_kv_len():
    args = greedy_inputs(9, 5, 3, kv_dtype=torch.int32)
    with poisoned_allocations():
        out = verify_greedy_triton(*args)
    assert_same(out, verify_greedy_reference(*args))


def sampling_inputs(batch, n, vocab, seed, noise_dtype=torch.float64, strided=False):
    """q peaked and p a mix of q and another distribution, so acceptance lengths spread over 0..n."""
    gen = seeded(seed)
    q_all = torch.softmax(torch.randn(batch, n + 2, vocab, generator=gen) * 2, dim=-1)
    q = q_all[:, :n] if strided else q_all[:, :n].contiguous()   # speculative.py passes a [:, :n] view
    other = torch.softmax(torch.randn(batch, n + 1, vocab, generator=gen) * 2, dim=-1)
    p = 0.7 * torch.cat([q, q[:, -1:]], dim=1) + 0.3 * other
    drafts = (q / -torch.log(torch.rand(q.shape, generator=gen, dtype=torch.float64))).argmax(-1)
    num_drafts = torch.randint(1, n + 1, (batch,), generator=gen)
    uniforms = torch.rand(batch, n, generator=gen, dtype=torch.float64)
    uniforms[0] = 0.0   # row 0 accepts every real draft: the bonus race on p
    noise = -torch.log(torch.rand(batch, vocab, generator=gen, dtype=torch.float64))
    kv_len = torch.randint(0, 500, (batch,), generator=gen)
    args = [x.to(DEVICE) for x in (drafts, num_drafts, q, p, uniforms.to(noise_dtype), noise.to(noise_dtype), kv_len)]
    if strided:   # a copy to another device is contiguous: slice there
        args[2] = q_all.to(DEVICE)[:, :n]
    return tuple(args)


@pytest.mark.parametrize("batch,n,vocab", [(1, 1, 70), (9, 5, 70), (6, 16, 129)])
@pytest.mark.parametrize("noise_dtype", [torch.float64, torch.float32], ids=["fp64-noise", "fp32-noise"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling(batch, n, vocab, noise_dtype, seed):
    args = sampling_inputs(batch, n, vocab, seed, noise_dtype)
    with poisoned_allocations():
        out = verify_sampling_launch(*args, config=SMALL)
    ref = verify_sampling_reference(*args)
    assert_same(out, ref)


def test_sampling_strided_probs_and_default_config():
    args = sampling_inputs(9, 5, 70, 4, strided=True)
    assert not args[2].is_contiguous()
    with poisoned_allocations():
        out = verify_sampling_triton(*args)
    assert_same(out, verify_sampling_reference(*args))


def test_sampling_all_zero_residual_falls_back_to_p():
    """u = 1 rejects a draft even where p == q; then (p - q)+ is all zero and the token is drawn from p."""
    drafts, num_drafts, q, p, uniforms, noise, kv_len = sampling_inputs(4, 3, 70, 5)
    p = torch.cat([q, q[:, -1:]], dim=1).clone()
    uniforms = torch.ones_like(uniforms)
    args = (drafts, num_drafts, q, p, uniforms, noise, kv_len)
    ref = verify_sampling_reference(*args)
    assert bool((ref[1] == 0).all())
    with poisoned_allocations():
        out = verify_sampling_launch(*args, config=SMALL)
    assert_same(out, ref)


def test_dispatchers_use_the_kernels():
    g_args = greedy_inputs(5, 4, 6)
    s_args = sampling_inputs(5, 4, 70, 6)
    previous = backend.get_backend()
    backend.set_backend("triton")
    try:
        with poisoned_allocations():
            g_out, s_out = verify_greedy(*g_args), verify_sampling(*s_args)
    finally:
        backend.set_backend(previous)
    assert_same(g_out, verify_greedy_reference(*g_args))
    assert_same(s_out, verify_sampling_reference(*s_args))


# ---- GPU only: batch 64 at the real vocabulary size ----------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("vocab", [49152, 151936])
def test_real_shapes(vocab):
    from autotune.spaces import verify_inputs
    x = verify_inputs(64, 15, vocab, device=DEVICE)
    s_args = (x["draft_tokens"], x["num_drafts"], x["draft_probs"], x["target_probs"], x["uniforms"],
              x["race_noise"], x["kv_len"])
    with poisoned_allocations():
        out = verify_sampling_triton(*s_args)
    assert_same(out, verify_sampling_reference(*s_args))
    g_args = (x["draft_tokens"], x["num_drafts"], x["target_argmax"], x["kv_len"])
    with poisoned_allocations():
        out = verify_greedy_triton(*g_args)
    assert_same(out, verify_greedy_reference(*g_args))
