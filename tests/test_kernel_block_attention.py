"""block_attention_triton against block_attention_reference: ragged limits, GQA, masks, cache splits, strides."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_utils import DEVICE, DTYPES, assert_close, gpu_only, poisoned_allocations, randn, seeded  # noqa: E402

from kernels import backend  # noqa: E402
from kernels.block_attention import (MAX_TREE_SLOTS, block_attention, block_attention_launch,  # noqa: E402
                                     block_attention_reference, block_attention_triton, step_arguments, tree_bits)

SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "num_splits": 0}   # many tiles
SPLIT = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "num_splits": 3}   # cache split 3 ways

# name: (batch, q heads, kv heads, head dim, cache slots, num_clean, mask groups, group_size)
CASES = {
    "decode-gqa3": (3, 6, 2, 16, 300, 1, 0, 1),
    "decode-mha-d64": (2, 2, 2, 64, 300, 1, 0, 1),
    "prefill-17": (2, 3, 1, 16, 300, 17, 0, 1),
    "sequential-16-masks": (2, 6, 2, 16, 300, 0, 1, 16),
    "parallel-3-groups": (2, 6, 2, 64, 300, 3, 3, 4),
    "parallel-2-groups-of-16": (1, 3, 1, 16, 100, 2, 2, 16),
}


def make_step(name: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """One step of a ragged batch: sequence b has its own cached length; clean token t sees slots <= cached + t;
    mask group a sees slots <= cached + a (its anchor), or the cached prefix when there are no clean tokens."""
    B, Hq, Hkv, D, S, num_clean, groups, group_size = CASES[name]
    gen = seeded(seed)
    num_masks = groups * group_size
    T = num_clean + num_masks
    cached = torch.randint(1, S - num_clean, (B,), generator=gen)
    cached[0] = 0 if num_clean else 1   # one sequence starts empty (prefill) or nearly
    clean = cached[:, None] + torch.arange(num_clean)[None, :]
    if num_clean:
        anchor = cached[:, None] + torch.arange(groups).repeat_interleave(group_size)[None, :].clamp(max=num_clean - 1)
    else:
        anchor = (cached - 1)[:, None].expand(B, num_masks)
    kv_limit = torch.cat([clean, anchor], dim=1).to(DEVICE)
    # the cache is a view of a [layers, B, Hkv, S, D] tensor; q is a transposed (non-contiguous) view
    k_all, v_all = randn(3, B, Hkv, S, D, gen=gen, dtype=dtype), randn(3, B, Hkv, S, D, gen=gen, dtype=dtype)
    q = randn(B, Hq, T, D, gen=gen, dtype=dtype).transpose(1, 2)
    masks = (randn(B, num_masks, Hkv, D, gen=gen, dtype=dtype), randn(B, num_masks, Hkv, D, gen=gen, dtype=dtype))
    return dict(q=q, k_cache=k_all[1], v_cache=v_all[1], kv_limit=kv_limit,
                k_mask=masks[0] if num_masks else None, v_mask=masks[1] if num_masks else None,
                num_clean=num_clean, group_size=group_size)


def run_poisoned(fn, **kwargs):
    with poisoned_allocations():
        return fn(**kwargs)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("config", [SMALL, SPLIT], ids=["tiles", "split3"])
def test_matches_reference_fp32(name, config):
    step = make_step(name, torch.float32)
    out = run_poisoned(block_attention_launch, **step, config=config)
    assert out.shape == step["q"].shape and out.dtype == torch.float32
    assert_close(out, block_attention_reference(**step))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=["fp16", "bf16"])
def test_matches_reference_low_precision(name, dtype):
    step = make_step(name, dtype, seed=1)
    out = run_poisoned(block_attention_launch, **step, config=SMALL)
    assert out.dtype == dtype
    assert_close(out, block_attention_reference(**step), dtype)


@pytest.mark.parametrize("name", ["decode-gqa3", "parallel-2-groups-of-16"])
def test_more_splits_than_tiles(name):
    """16 splits of ranges a few tiles long: most splits see nothing (their partial results must merge as empty)."""
    step = make_step(name, torch.float32, seed=6)
    out = run_poisoned(block_attention_launch, **step, config={**SMALL, "num_splits": 16})
    assert_close(out, block_attention_reference(**step))


@pytest.mark.parametrize("name", ["decode-gqa3", "parallel-3-groups"])
def test_public_wrapper_default_config(name):
    step = make_step(name, torch.float32, seed=2)
    assert_close(run_poisoned(block_attention_triton, **step), block_attention_reference(**step))


def test_kv_extent_bounds_the_cache():
    step = make_step("prefill-17", torch.float32, seed=3)
    full = int(step["kv_limit"].max()) + 1
    for extent in (full, 40):   # 40 cuts some rows' limits: those slots become invisible, as in the reference
        out = run_poisoned(block_attention_launch, **step, kv_extent=extent, config=SMALL)
        assert_close(out, block_attention_reference(**step, kv_extent=extent))


def test_explicit_scale():
    step = make_step("parallel-3-groups", torch.float32, seed=4)
    out = run_poisoned(block_attention_launch, **step, scale=0.3, config=SMALL)
    assert_close(out, block_attention_reference(**step, scale=0.3))


def test_dispatcher_uses_the_kernel():
    step = make_step("sequential-16-masks", torch.float32, seed=5)
    previous = backend.get_backend()
    backend.set_backend("triton")
    try:
        out = run_poisoned(block_attention, **step)
    finally:
        backend.set_backend(previous)
    assert_close(out, block_attention_reference(**step))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("which", ["torch", "triton"])
def test_step_arguments_serve_every_layer(name, which):
    """The model builds the arguments a step's layers share once (for the reference: its extent and visibility);
    attention from them is the reference's, whichever backend runs it."""
    check_step_arguments(make_step(name, torch.float32, seed=6), ("kv_limit", "num_clean", "group_size"), which)


def check_step_arguments(step: dict, shared_keys: tuple[str, ...], which: str) -> None:
    """``step_arguments`` from ``shared_keys`` of ``step``, on backend ``which``: attention equals the reference's."""
    shared = {key: step.pop(key) for key in shared_keys}
    previous = backend.get_backend()
    backend.set_backend(which)
    try:
        args = step_arguments(**shared)
        assert ("allowed" in args) == (which == "torch")
        out = run_poisoned(block_attention, **step, **args)
    finally:
        backend.set_backend(previous)
    assert_close(out, block_attention_reference(**step, **shared))


# ---- tree steps: each node sees the cache before the step and its own ancestors ----------------------------------
def make_tree_step(dtype: torch.dtype, seed: int, slots: int = 12, batch: int = 3,
                   group_size: int = 0) -> tuple[dict, torch.Tensor]:
    """A tree step of a ragged batch (random trees, parents before children), with ``group_size`` masks anchored at
    every node when set (a parallel tree step), and, built directly from the parents, the boolean ancestors
    [B, slots, slots] its bitmasks encode."""
    Hq, Hkv, D, S = 6, 2, 16, 200
    gen = seeded(seed)
    parents = [[0] + [int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, slots)] for _ in range(batch)]
    ancestors = torch.zeros(batch, slots, slots, dtype=torch.bool)
    for b in range(batch):
        for t in range(slots):
            at = t
            ancestors[b, t, at] = True
            while at:
                at = parents[b][at]
                ancestors[b, t, at] = True
    kv_len = torch.randint(1, S - slots, (batch,), generator=gen)
    kv_len[0] = 1
    num_masks = slots * group_size
    T = slots + num_masks
    k_all, v_all = randn(3, batch, Hkv, S, D, gen=gen, dtype=dtype), randn(3, batch, Hkv, S, D, gen=gen, dtype=dtype)
    q = randn(batch, Hq, T, D, gen=gen, dtype=dtype).transpose(1, 2)
    node = torch.cat([torch.arange(slots), torch.arange(slots).repeat_interleave(group_size)])   # a mask's anchor
    bits = tree_bits(ancestors)[:, node]
    kv_limit = kv_len[:, None] + node[None, :]
    masks = (randn(batch, num_masks, Hkv, D, gen=gen, dtype=dtype), randn(batch, num_masks, Hkv, D, gen=gen, dtype=dtype))
    step = dict(q=q, k_cache=k_all[1], v_cache=v_all[1], kv_limit=kv_limit.to(DEVICE), tree=bits.to(DEVICE),
                k_mask=masks[0] if num_masks else None, v_mask=masks[1] if num_masks else None, num_clean=slots,
                group_size=max(group_size, 1))
    return step, ancestors


def attention_from_ancestors(step: dict, ancestors: torch.Tensor) -> torch.Tensor:
    """The same step by masked SDPA, visibility built from the boolean ancestors rather than the bitmasks: the cache
    before the step, the anchor node's path, and (a mask) its own group."""
    kv_len = step["kv_limit"][:, 0].cpu()
    B, T = step["kv_limit"].shape
    slots, group_size = step["num_clean"], step["group_size"]
    node = torch.cat([torch.arange(slots), torch.arange(slots).repeat_interleave(group_size)])[:T]
    S = step["k_cache"].shape[2]
    rel = torch.arange(S)[None, None, :] - kv_len[:, None, None]
    path = ancestors[:, node]                                                               # [B, T, slots]
    own = (rel >= 0) & (rel < slots) & path.gather(2, rel.clamp(0, slots - 1).expand(B, T, S))
    allowed = (rel < 0) | own
    keys, values = step["k_cache"].float(), step["v_cache"].float()
    if step["k_mask"] is not None:
        group = torch.arange(T)[:, None] - slots
        same = (group >= 0) & (group // group_size == torch.arange(T - slots)[None, :] // group_size)
        allowed = torch.cat([allowed, same[None].expand(B, -1, -1)], dim=2)
        keys = torch.cat([keys, step["k_mask"].float().transpose(1, 2)], dim=2)
        values = torch.cat([values, step["v_mask"].float().transpose(1, 2)], dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(
        step["q"].float().transpose(1, 2), keys, values, attn_mask=allowed[:, None].to(DEVICE), enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("config", [SMALL, SPLIT], ids=["tiles", "split3"])
@pytest.mark.parametrize("slots,group_size", [(12, 0), (MAX_TREE_SLOTS, 0), (7, 3)],
                         ids=["12-nodes", "64-nodes", "7-nodes-with-mask-groups"])
def test_tree_step_matches_reference_fp32(config, slots, group_size):
    step, ancestors = make_tree_step(torch.float32, seed=slots, slots=slots, group_size=group_size)
    out = run_poisoned(block_attention_launch, **step, config=config)
    reference = block_attention_reference(**step)
    assert_close(out, reference)
    assert_close(reference, attention_from_ancestors(step, ancestors))   # the bitmasks say what the parents say


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=["fp16", "bf16"])
def test_tree_step_matches_reference_low_precision(dtype):
    step, _ = make_tree_step(dtype, seed=3, slots=9, batch=2, group_size=2)
    out = run_poisoned(block_attention_launch, **step, config=SMALL)
    assert out.dtype == dtype
    assert_close(out, block_attention_reference(**step), dtype)


@pytest.mark.parametrize("which", ["torch", "triton"])
def test_tree_step_arguments_serve_every_layer(which):
    step, _ = make_tree_step(torch.float32, seed=5, group_size=2)
    check_step_arguments(step, ("kv_limit", "num_clean", "group_size", "tree"), which)
    with pytest.raises(ValueError, match="at most 64"):
        tree_bits(torch.ones(3, 65, 65, dtype=torch.bool))


# ---- GPU only: bf16 at the real shapes, default and tuned configs, automatic cache splits ------------------------
@gpu_only
@pytest.mark.parametrize("model", ["smollm2-135m", "qwen3-8b"])
@pytest.mark.parametrize("mode,batch", [("decode", 1), ("decode", 64), ("sequential", 8), ("parallel", 1),
                                        ("parallel", 8), ("prefill", 2)])
def test_real_shapes_bf16(model, mode, batch):
    from autotune.spaces import MODELS, attention_inputs
    m = MODELS[model]
    step = attention_inputs(batch, mode, head_dim=m["head_dim"], heads=m["heads"], kv_heads=m["kv_heads"],
                            cache_len=256 if mode == "prefill" else 1024, dtype=torch.bfloat16, device=DEVICE)
    out = run_poisoned(block_attention_triton, **step)
    torch.testing.assert_close(out.float(), block_attention_reference(**step).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_cpu_path_matches_fp32_attention(name):
    """The reference's bf16 CPU path (grouped GEMMs, not SDPA) against fp32 SDPA on the same inputs."""
    step = make_step(name, torch.bfloat16, seed=7)
    step = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in step.items()}
    exact = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in step.items()}
    out = block_attention_reference(**step)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), block_attention_reference(**exact), rtol=2e-2, atol=2e-2)
