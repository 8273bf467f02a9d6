"""What the sweep tries: per-kernel config spaces (with a ``keep`` filter, as in Triton tutorial 06) and the
representative problems it times them on, built from the shapes of the models this project targets.

A problem is one store key: ``config_key(dim, tokens, batch, dtype)``. The same input builders serve the tests'
GPU cases, ``tests/bench_kernels.py`` and ``experiments/gpu_check.py``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton

from autotune.store import config_key

# (name, hidden, q heads, kv heads, head dim, vocab, calibration rank)
MODELS = {
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, vocab=49152, rank=256),
    "llama-3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, vocab=128256, rank=512),
    "qwen3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, vocab=151936, rank=512),
    # interpreter-sized, for dry runs on a CPU
    "tiny": dict(hidden=48, heads=4, kv_heads=2, head_dim=16, vocab=300, rank=40),
}
BLOCK_SIZE = 16   # masks per group (B_s)


# ---- config spaces -----------------------------------------------------------------------------------------------
def attention_space(rows: int, head_dim: int, quick: bool = False) -> list[dict]:
    """rows = query tokens x query heads per kv head. Few rows (decode) also try fixed cache splits (0 = auto)."""
    splits = (0, 8, 32) if rows <= 16 else (0,)
    if quick:
        grid = itertools.product((16, 64), (64, 128), (4,), (2, 3), splits[:2])
    else:
        grid = itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8), (2, 3), splits)
    out = []
    for bm, bn, warps, stages, num_splits in grid:
        if bm > max(16, triton.next_power_of_2(rows)):   # a tile taller than the rows only adds padding
            continue
        if head_dim >= 128 and bm * bn > 64 * 128:      # registers and shared memory
            continue
        if bm >= 128 and warps < 8:
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "num_splits": num_splits})
    return out


def draft_head_space(rows: int, quick: bool = False) -> list[dict]:
    if quick:
        grid = itertools.product((16, 64, 128), (128, 256), (64,), (4, 8), (3,))
    else:
        grid = itertools.product((16, 32, 64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (3, 4))
    out = []
    for bn, bv, bk, warps, stages in grid:
        if bn > max(16, triton.next_power_of_2(rows)):
            continue
        if bn * bv > 128 * 256 or bv * bk > 256 * 64 or (bn * bv >= 64 * 256 and warps < 8):
            continue
        out.append({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages})
    return out


def verify_sampling_space(quick: bool = False) -> list[dict]:
    grid = itertools.product((1024, 4096), (4, 8)) if quick else itertools.product((512, 1024, 2048, 4096),
                                                                                  (4, 8, 16))
    return [{"BLOCK_V": bv, "num_warps": w} for bv, w in grid]


# ---- inputs ----------------------------------------------------------------------------------------------------------
def attention_inputs(batch: int, mode: str, *, head_dim: int, heads: int, kv_heads: int, cache_len: int,
                     dtype=torch.bfloat16, device="cuda", drafts: int = 15, group_size: int = BLOCK_SIZE,
                     seed: int = 0, layers: int = 2) -> dict:
    """Keyword arguments of ``block_attention`` for one step of ``mode`` over a ragged batch.

    decode: 1 clean token; sequential: one mask group (num_clean 0) seeing the cache; parallel: ``drafts + 1`` clean
    tokens [bonus, d_1..d_v] and ``drafts + 1`` mask groups, group a anchored on clean token a; tree: the bonus and
    ``drafts`` nodes of a binary tree (node j's parent is (j - 1) // 2), each seeing the cache and its ancestors;
    prefill: ``cache_len`` clean tokens, causal from slot 0. Sequence b holds ``cache_len - (37 * b) % (cache_len // 4 + 1)`` cached tokens
    before the step, so limits are ragged. The cache is a strided view of a ``[layers, B, Hkv, S, D]`` tensor.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    if mode == "prefill":
        num_clean, num_groups, cached = cache_len, 0, torch.zeros(batch, dtype=torch.int64)
    else:
        num_clean = {"decode": 1, "sequential": 0, "parallel": drafts + 1, "tree": drafts + 1}[mode]
        num_groups = {"decode": 0, "sequential": 1, "parallel": drafts + 1, "tree": 0}[mode]
        cached = cache_len - (37 * torch.arange(batch)) % (cache_len // 4 + 1)
    num_masks = num_groups * group_size
    T = num_clean + num_masks
    S = int(cached.max()) + num_clean + 8
    clean_limit = cached[:, None] + torch.arange(num_clean)[None, :]          # the cache holds this step's clean K/V
    if mode == "sequential":
        mask_limit = (cached - 1).clamp(min=0)[:, None].expand(batch, num_masks)  # the whole cached prefix
    else:
        anchor = torch.arange(num_groups).repeat_interleave(group_size)        # group a sees clean tokens 0..a
        mask_limit = cached[:, None] + anchor[None, :]
    kv_limit = torch.cat([clean_limit, mask_limit], dim=1).to(device)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    k_all, v_all = rnd(layers, batch, kv_heads, S, head_dim), rnd(layers, batch, kv_heads, S, head_dim)
    x = dict(q=rnd(batch, T, heads, head_dim), k_cache=k_all[layers - 1], v_cache=v_all[layers - 1],
             kv_limit=kv_limit, k_mask=rnd(batch, num_masks, kv_heads, head_dim) if num_masks else None,
             v_mask=rnd(batch, num_masks, kv_heads, head_dim) if num_masks else None,
             num_clean=num_clean, group_size=group_size if num_masks else 1)
    if mode == "tree":
        bits = [1]
        for j in range(1, T):
            bits.append(bits[(j - 1) // 2] | (1 << j))
        x["tree"] = torch.tensor(bits, dtype=torch.int64, device=device).expand(batch, -1).contiguous()
    return x


def attention_bytes(inputs: dict) -> int:
    """Bytes an ideal kernel moves: each sequence's visible cache K and V, the masks' K/V, Q in and O out."""
    q, k = inputs["q"], inputs["k_cache"]
    B, T, Hq, D = q.shape
    Hkv = k.shape[1]
    visible = int((inputs["kv_limit"].max(dim=1).values + 1).sum())
    masks = 0 if inputs["k_mask"] is None else inputs["k_mask"].numel() * 2
    return (2 * visible * Hkv * D + masks + 2 * q.numel()) * q.element_size()


def attention_flops(inputs: dict) -> int:
    """FLOPs of the visible (query, key) pairs only: 2 * D for q.k and 2 * D for p.v per pair and query head."""
    q = inputs["q"]
    B, T, Hq, D = q.shape
    pairs = int((inputs["kv_limit"] + 1).sum())
    if inputs["k_mask"] is not None:
        pairs += B * (T - inputs["num_clean"]) * inputs["group_size"]
    return 4 * D * Hq * pairs


def draft_head_inputs(rows: int, *, hidden: int, vocab: int, rank: int, dtype=torch.bfloat16, device="cuda",
                      seed: int = 0, calibrated: bool = True) -> tuple[tuple, dict]:
    """(args, kwargs) of ``draft_head`` for ``rows`` mask slots, greedy."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    calibration = (rnd(rank, 2 * hidden, scale=hidden ** -0.5), rnd(rank, scale=0.1),
                   rnd(vocab, rank, scale=rank ** -0.5), rnd(vocab, scale=0.1)) if calibrated else None
    args = (rnd(rows, hidden), 1.0 + rnd(hidden, scale=0.1), 1e-6, rnd(vocab, hidden, scale=hidden ** -0.5),
            rnd(rows, hidden), calibration)
    return args, {}


def verify_inputs(batch: int, drafts: int, vocab: int, *, device="cuda", seed: int = 0, probs_dtype=torch.float32,
                  noise_dtype=torch.float64) -> dict:
    """Inputs of both verifications: drafts sampled from q, p close to q so acceptance lengths spread out."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.softmax(torch.randn(batch, drafts, vocab, generator=g).to(device) * 3, dim=-1)
    mix = torch.softmax(torch.randn(batch, drafts + 1, vocab, generator=g).to(device) * 3, dim=-1)
    q_next = torch.cat([q, q[:, -1:]], dim=1)
    p = (0.8 * q_next + 0.2 * mix)
    draft_tokens = (q / -torch.log(torch.rand(q.shape, generator=g, dtype=torch.float64).to(device))).argmax(-1)
    target_argmax = p.argmax(-1)
    return dict(draft_tokens=draft_tokens, num_drafts=torch.randint(1, drafts + 1, (batch,), generator=g).to(device),
                target_argmax=target_argmax,
                draft_probs=q.to(probs_dtype), target_probs=p.to(probs_dtype),
                uniforms=torch.rand(batch, drafts, generator=g, dtype=torch.float64).to(device, noise_dtype),
                race_noise=(-torch.log(torch.rand(batch, vocab, generator=g, dtype=torch.float64))).to(device,
                                                                                                      noise_dtype),
                kv_len=torch.randint(0, 1000, (batch,), generator=g).to(device))


# ---- sweep problems --------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    kernel: str
    key: str
    describe: str
    make: Callable[[], object]                     # -> inputs
    run: Callable[[object, dict | None], object]   # (inputs, config) -> output
    reference: Callable[[object], object]
    space: list[dict] = field(default_factory=list)


def problems(kernel: str, quick: bool = False, dtype=torch.bfloat16, device="cuda", tiny: bool = False
             ) -> list[Problem]:
    """The sweep's problems for ``kernel``; ``tiny`` gives interpreter-sized ones (CPU dry runs)."""
    from kernels.block_attention import block_attention_launch, block_attention_reference
    from kernels.draft_head import draft_head_launch, draft_head_reference
    from kernels.verify import verify_sampling_launch, verify_sampling_reference

    out: dict[str, Problem] = {}
    models = ["tiny"] if tiny else ["smollm2-135m", "qwen3-8b"]   # llama-3-8b shares qwen3's attention shapes
    batches = (1, 2) if tiny else (1, 64) if quick else (1, 4, 16, 64)
    cache_len, drafts, group = (48, 2, 4) if tiny else (1024, BLOCK_SIZE - 1, BLOCK_SIZE)
    for name in models:
        m = MODELS[name]
        if kernel == "block_attention":
            modes = ("decode", "parallel") if quick else ("decode", "sequential", "parallel")
            for mode, batch in itertools.product(modes, batches):
                kw = dict(head_dim=m["head_dim"], heads=m["heads"], kv_heads=m["kv_heads"], cache_len=cache_len,
                          dtype=dtype, device=device, drafts=drafts, group_size=group)
                T = {"decode": 1, "sequential": group, "parallel": (drafts + 1) * (1 + group)}[mode]
                key = config_key(m["head_dim"], T, batch, dtype)
                rows = T * m["heads"] // m["kv_heads"]
                out.setdefault(key, Problem(
                    kernel, key, f"{name} {mode} batch {batch} cache {cache_len}",
                    make=lambda batch=batch, mode=mode, kw=kw: attention_inputs(batch, mode, **kw),
                    run=lambda x, cfg: block_attention_launch(**x, config=cfg),
                    reference=lambda x: block_attention_reference(**x),
                    space=attention_space(rows, m["head_dim"], quick)[:3 if tiny else None]))
        elif kernel == "draft_head":
            for batch in batches:
                rows = batch * (group - 1)
                key = config_key(m["hidden"], rows, 1, dtype)
                kw = dict(hidden=m["hidden"], vocab=m["vocab"], rank=m["rank"], dtype=dtype, device=device)
                out.setdefault(key, Problem(
                    kernel, key, f"{name} draft head, {rows} rows",
                    make=lambda rows=rows, kw=kw: draft_head_inputs(rows, **kw),
                    run=lambda x, cfg: draft_head_launch(*x[0], **x[1], config=cfg),
                    reference=lambda x: draft_head_reference(*x[0], **x[1]),
                    space=draft_head_space(rows, quick)[:3 if tiny else None]))
        elif kernel == "verify_sampling":
            for batch in batches:
                key = config_key(m["vocab"], drafts + 1, batch, torch.float32)
                out.setdefault(key, Problem(
                    kernel, key, f"{name} vocab, batch {batch}, {drafts} drafts",
                    make=lambda batch=batch, vocab=m["vocab"]: verify_inputs(batch, drafts, vocab, device=device),
                    run=lambda x, cfg: verify_sampling_launch(*_sampling_args(x), config=cfg),
                    reference=lambda x: verify_sampling_reference(*_sampling_args(x)),
                    space=verify_sampling_space(quick)[:3 if tiny else None]))
        else:
            raise ValueError(f"no sweep for kernel {kernel!r}")
    return list(out.values())


def _sampling_args(x: dict) -> tuple:
    return (x["draft_tokens"], x["num_drafts"], x["draft_probs"], x["target_probs"], x["uniforms"], x["race_noise"],
            x["kv_len"])


TUNED_KERNELS = ("block_attention", "draft_head", "verify_sampling")
