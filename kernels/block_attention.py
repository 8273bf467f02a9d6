"""Mask-token block attention: one call attends a whole step of a ragged batch.

A step's queries are laid out per sequence as ``[clean tokens (num_clean) | mask tokens (num_groups * group_size)]``.
Visibility comes from index rules, never from a stored mask:

* every query t of row b sees cache slots ``j <= kv_limit[b, t]`` (the cache already holds this step's clean K/V,
  so for a clean token ``kv_limit`` is its own position: causal; for a mask it is its group's anchor position);
* a mask query additionally sees the masks of its own group (bidirectional), whose K/V come from the drafter's
  projections and are never written to the cache; clean queries never see masks;
* a tree step (``tree`` [B, T] int64; ``flexdraft/tree.py``) writes its clean tokens at consecutive slots from the
  root's ``kv_limit[b, 0]``; of those slots a query sees only the ones set in its bitmask (bit i: slot
  ``kv_limit[b, 0] + i``, its node's ancestors and itself; a mask query carries its anchor node's), so at most 64
  clean tokens.

Shapes (any float dtype; the cache tensors may be strided views into the ``[layers, B, Hkv, S, D]`` cache):
  q        [B, T, Hq, D]      T = num_clean + num_masks
  k_cache  [B, Hkv, S, D]
  v_cache  [B, Hkv, S, D]
  kv_limit [B, T] int         >= 0, < S
  k_mask   [B, num_masks, Hkv, D] or None
  v_mask   [B, num_masks, Hkv, D] or None
  tree     [B, T] int64 or None
  returns  [B, T, Hq, D]

The Triton kernel (``block_attention_triton``, same signature) runs the whole step in one launch: each program owns a
tile of query rows of one (sequence, kv head) pair. Rows are (query token, query head of the kv head's group) pairs,
so the grouped query heads of GQA share every K/V tile they load. Softmax is online in exp2 space with fp32
accumulation; cache tiles past the tile's largest kv_limit are never loaded, tiles below its smallest kv_limit run
without a mask. When the grid is too small to fill the GPU (decode at small batch) the cache is split across
programs and a second small kernel merges the partial results (flash-decoding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autotune.store import config_key, lookup
from kernels import backend, cpu_attention
from kernels.backend import check_device, sm_count


MAX_TREE_SLOTS = 64   # a tree step's clean tokens: one bit each in an int64


def visibility(kv_limit: torch.Tensor, kv_extent: int, num_clean: int, num_masks: int, group_size: int,
               tree: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, kv_extent + num_masks] built from the index rules (the reference's only mask)."""
    device = kv_limit.device
    j = torch.arange(kv_extent, device=device)[None, None, :]
    sees_cache = j <= kv_limit[:, :, None]
    if tree is not None:   # of the step's own slots, from the root's on, only those in the query's bitmask
        step = j - kv_limit[:, :1, None]
        sees_cache &= (step < 0) | ((tree[:, :, None] >> step.clamp(0, MAX_TREE_SLOTS - 1)) & 1 == 1)
    if num_masks == 0:
        return sees_cache[:, None]
    t = torch.arange(num_clean + num_masks, device=device)
    m = torch.arange(num_masks, device=device)
    query_group = torch.where(t >= num_clean, (t - num_clean) // group_size, -1)
    sees_masks = query_group[:, None] == (m // group_size)[None, :]
    sees_masks = sees_masks[None].expand(kv_limit.shape[0], -1, -1)
    return torch.cat([sees_cache, sees_masks], dim=-1)[:, None]


def block_attention_reference(q, k_cache, v_cache, kv_limit, k_mask=None, v_mask=None, *, num_clean: int,
                              group_size: int = 1, scale: float | None = None, kv_extent: int | None = None,
                              allowed: torch.Tensor | None = None, tree: torch.Tensor | None = None):
    """Plain-PyTorch block attention (SDPA over the cache prefix that any query can see, plus the step's masks).

    ``kv_extent`` (optional) is ``max(kv_limit) + 1``; passing it avoids a host sync. ``allowed`` (optional, with
    ``kv_extent``) is ``visibility(...)`` of these arguments, built once for all layers of a step (``step_arguments``).
    """
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    num_masks = 0 if k_mask is None else k_mask.shape[1]
    if kv_extent is None:
        kv_extent = int(kv_limit.max()) + 1
    keys, values = k_cache[:, :, :kv_extent], v_cache[:, :, :kv_extent]
    if num_masks:
        keys = torch.cat([keys, k_mask.transpose(1, 2)], dim=2)
        values = torch.cat([values, v_mask.transpose(1, 2)], dim=2)
    if allowed is None:
        allowed = visibility(kv_limit, kv_extent, num_clean, num_masks, group_size, tree)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return grouped_attention(q, keys, values, allowed, scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=allowed, scale=scale,
                                         enable_gqa=Hq != Hkv)
    return out.transpose(1, 2)


def grouped_attention(q, keys, values, allowed, scale: float | None = None):
    """Masked attention as two batched GEMMs per kv head, its query heads stacked, softmax in fp32.

    q [B, T, Hq, D]; keys, values [B, Hkv, S, D]; allowed [B, 1, T, S]. Used for bf16 on a CPU, where PyTorch's
    fused SDPA kernel is 5-10x slower than in fp32 (measured: 5.5 vs 0.5 ms at batch 16, 600 keys); scores are
    rounded to bf16 once, as any bf16 matmul would.
    """
    B, T, Hq, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    group = Hq // Hkv
    stacked = q.permute(0, 2, 1, 3).reshape(B, Hkv, group * T, D)          # kv head h serves q heads h*g .. h*g+g-1
    scores = (stacked @ keys.transpose(-1, -2)).float().view(B, Hkv, group, T, S)
    scores = scores * (D ** -0.5 if scale is None else scale)
    probs = scores.masked_fill(~allowed[:, :, None], float("-inf")).softmax(-1).to(q.dtype)
    out = probs.view(B, Hkv, group * T, S) @ values
    return out.view(B, Hq, T, D).transpose(1, 2)


# ---- Triton kernel -------------------------------------------------------------------------------------------------
@triton.jit
def _attend_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One K/V tile of the online softmax (exp2 space; qk_scale already holds log2(e))."""
    if IEEE:  # fp32 inputs: keep fp32 products (tf32 would cost ~1e-3 relative error)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf: shift by 0 so that exp2 gives 0 rather than NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _block_attention_kernel(
        Q, K, V, KM, VM, LIM, TREE, O, O_PART, LSE_PART,
        sq_b, sq_t, sq_h, sq_d,
        sk_b, sk_h, sk_s, sk_d,
        sv_b, sv_h, sv_s, sv_d,
        skm_b, skm_m, skm_h, skm_d,
        svm_b, svm_m, svm_h, svm_d,
        sl_b, sl_t,
        st_b, st_t,
        so_b, so_t, so_h, so_d,
        num_rows, num_heads_kv, group_heads, kv_end, num_clean, num_masks, group_size, num_splits, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_MASKS: tl.constexpr, HAS_TREE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // num_heads_kv).to(tl.int64)
    hkv = bh % num_heads_kv

    # Query rows of this tile: row r is (query token t, query head hkv * group_heads + g).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    t = rows // group_heads
    hq = hkv * group_heads + rows % group_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sq_b + t[:, None] * sq_t + hq[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # kv_limit per row, clipped to the cache extent; a padding row sees nothing.
    kv_limit = tl.load(LIM + b * sl_b + t * sl_t, mask=row_ok, other=-1).to(tl.int32)
    kv_limit = tl.minimum(kv_limit, kv_end - 1)
    lim_max = tl.max(tl.where(row_ok, kv_limit, -1), 0)
    lim_min = tl.min(tl.where(row_ok, kv_limit, kv_end), 0)
    if HAS_TREE:
        # Of the step's own slots a node sees only its ancestors: no tile past the root's slot is seen by all rows.
        tree_root = tl.load(LIM + b * sl_b).to(tl.int32)
        tree_bits = tl.load(TREE + b * st_b + t * st_t, mask=row_ok, other=0)
        lim_min = tl.minimum(lim_min, tree_root)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_base = K + b * sk_b + hkv * sk_h
    v_base = V + b * sv_b + hkv * sv_h
    offs_n = tl.arange(0, BLOCK_N)
    # The cache range up to the tile's largest kv_limit (later tiles are never loaded), or this split's share of it:
    # splits divide the range the tile actually sees, so ragged lengths need no host sync to be split evenly.
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(lim_max + 1, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = split * chunk
        kv_hi = tl.minimum(kv_lo + chunk, lim_max + 1)
    else:
        kv_lo = 0
        kv_hi = lim_max + 1
    # Stage 1: tiles every row sees entirely (j <= smallest kv_limit): no mask at all.
    full_end = kv_lo + tl.maximum(tl.minimum(kv_hi, lim_min + 1) - kv_lo, 0) // BLOCK_N * BLOCK_N
    for start_n in range(kv_lo, full_end, BLOCK_N):
        j = start_n + offs_n
        k = tl.load(k_base + j[:, None] * sk_s + offs_d[None, :] * sk_d, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + j[:, None] * sv_s + offs_d[None, :] * sv_d, mask=d_ok[None, :], other=0.0)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, None, qk_scale, False, IEEE)
    # Stage 2: the ragged band, j <= kv_limit per row.
    for start_n in range(full_end, kv_hi, BLOCK_N):
        j = start_n + offs_n
        j_ok = j < kv_hi
        k = tl.load(k_base + j[:, None] * sk_s + offs_d[None, :] * sk_d, mask=j_ok[:, None] & d_ok[None, :],
                    other=0.0)
        v = tl.load(v_base + j[:, None] * sv_s + offs_d[None, :] * sv_d, mask=j_ok[:, None] & d_ok[None, :],
                    other=0.0)
        visible = j[None, :] <= kv_limit[:, None]
        if HAS_TREE:
            step = j[None, :] - tree_root
            bit = (tree_bits[:, None] >> tl.minimum(tl.maximum(step, 0), 63).to(tl.int64)) & 1
            visible = visible & ((step < 0) | (bit == 1))
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, True, IEEE)

    # Stage 3 (last split only): the step's mask K/V. A mask query sees its own mask_group, bidirectionally;
    # clean queries see no mask. Only the groups of this tile's tokens are visited.
    if HAS_MASKS:
        t_lo = (pid_m * BLOCK_M) // group_heads
        t_hi = (tl.minimum((pid_m + 1) * BLOCK_M, num_rows) - 1) // group_heads
        if (split == num_splits - 1) & (t_hi >= num_clean):
            m_lo = tl.maximum(t_lo - num_clean, 0) // group_size * group_size
            m_hi = tl.minimum(((t_hi - num_clean) // group_size + 1) * group_size, num_masks)
            mask_group = tl.where(t >= num_clean, (t - num_clean) // group_size, -1)
            km_base = KM + b * skm_b + hkv * skm_h
            vm_base = VM + b * svm_b + hkv * svm_h
            for start_m in range(m_lo, m_hi, BLOCK_N):
                mk = start_m + offs_n
                mk_ok = mk < m_hi
                k = tl.load(km_base + mk[:, None] * skm_m + offs_d[None, :] * skm_d,
                            mask=mk_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(vm_base + mk[:, None] * svm_m + offs_d[None, :] * svm_d,
                            mask=mk_ok[:, None] & d_ok[None, :], other=0.0)
                visible = (mask_group[:, None] == (mk // group_size)[None, :]) & mk_ok[None, :]
                acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, True, IEEE)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        # Partial result of this split, normalised, with its log2-sum-exp for the merge.
        part = (split * tl.num_programs(1) + bh).to(tl.int64) * num_rows + rows
        tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(LSE_PART + part, lse, mask=row_ok)
    else:
        tl.store(O + b * so_b + t[:, None] * so_t + hq[:, None] * so_h + offs_d[None, :] * so_d,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(O_PART, LSE_PART, O, so_b, so_t, so_h, so_d, num_rows, num_heads_kv, group_heads,
                         num_splits, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_s 2^(lse_s - lse) * out_s over the cache splits of one (sequence, kv head) row tile."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    num_bh = tl.num_programs(1)
    b = (bh // num_heads_kv).to(tl.int64)
    hkv = bh % num_heads_kv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    offs_d = tl.arange(0, BLOCK_D)
    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        part = (s * num_bh + bh).to(tl.int64) * num_rows + rows
        lse_max = tl.maximum(lse_max, tl.load(LSE_PART + part, mask=row_ok, other=float("-inf")))
    lse_shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    weight = tl.zeros([BLOCK_M], tl.float32)
    for s in range(0, num_splits):
        part = (s * num_bh + bh).to(tl.int64) * num_rows + rows
        w = tl.math.exp2(tl.load(LSE_PART + part, mask=row_ok, other=float("-inf")) - lse_shift)
        o = tl.load(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        acc += w[:, None] * o
        weight += w
    out = acc / tl.where(weight == 0.0, 1.0, weight)[:, None]
    t = rows // group_heads
    hq = hkv * group_heads + rows % group_heads
    tl.store(O + b * so_b + t[:, None] * so_t + hq[:, None] * so_h + offs_d[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])


# ---- launch ----------------------------------------------------------------------------------------------------------
def default_config(rows: int, head_dim: int) -> dict:
    """Fixed launch settings when nothing is tuned: ``rows`` = query tokens x query heads per kv head."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 64 if head_dim <= 128 else 32, "num_warps": 4, "num_stages": 2,
            "num_splits": 0}


def num_cache_splits(programs: int, kv_end: int, device: torch.device) -> int:
    """How many programs share one row tile's cache range so that the grid fills the GPU (1 off CUDA).
    ``kv_end`` (kv_extent, else the cache capacity) only caps it: the kernel splits what each tile really sees."""
    sms = sm_count(device)
    if device.type != "cuda" or programs >= sms:
        return 1
    most = triton.cdiv(kv_end, 256)   # ~256 keys per split at least, so the merge pays for itself
    return max(1, min(triton.cdiv(2 * sms, programs), most, 64))


def block_attention_launch(q, k_cache, v_cache, kv_limit, k_mask=None, v_mask=None, *, num_clean: int,
                           group_size: int = 1, scale: float | None = None, kv_extent: int | None = None,
                           tree: torch.Tensor | None = None, config: dict | None = None,
                           out: torch.Tensor | None = None):
    """``block_attention_triton`` with an explicit launch ``config`` (the sweep and the tests use it) and an
    optional preallocated ``out`` [B, T, Hq, D]."""
    check_device(q.device)
    B, T, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if k_cache.shape[0] != B or v_cache.shape[:3] != k_cache.shape[:3] or k_cache.shape[3] != D:
        raise ValueError(f"k_cache/v_cache must be [B, Hkv, S, D] with B = {B}, D = {D}; got "
                         f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    if kv_limit.shape != (B, T):
        raise ValueError(f"kv_limit must be [B, T] = {[B, T]}, got {list(kv_limit.shape)}")
    num_masks = 0 if k_mask is None else k_mask.shape[1]
    if num_masks and not (num_clean + num_masks == T and group_size >= 1):
        raise ValueError(f"T ({T}) must be num_clean ({num_clean}) + num_masks ({num_masks})")
    if tree is not None and (tree.shape != (B, T) or num_clean > MAX_TREE_SLOTS):
        raise ValueError(f"a tree step has a tree [B, T] = {[B, T]} and at most {MAX_TREE_SLOTS} clean tokens; got "
                         f"a tree of {list(tree.shape)} and {num_clean} clean tokens")
    group_heads = Hq // Hkv
    rows = T * group_heads
    cfg = config or lookup("block_attention", config_key(D, T, B, q.dtype), default_config(rows, D), q.device)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_d = max(16, triton.next_power_of_2(D))
    kv_end = S if kv_extent is None else max(1, min(int(kv_extent), S))
    m_tiles = triton.cdiv(rows, block_m)
    splits = cfg.get("num_splits", 0) or num_cache_splits(m_tiles * B * Hkv, kv_end, q.device)
    if out is None:
        out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    if splits > 1:
        o_part = torch.empty((splits, B * Hkv, rows, block_d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, B * Hkv, rows), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out   # unused
    km, vm = (k_mask, v_mask) if num_masks else (q, q)   # dummies with the right pointer type when there are none
    tree_arg, st = (tree, tree.stride()) if tree is not None else (kv_limit, (0, 0))
    skm = k_mask.stride() if num_masks else (0, 0, 0, 0)
    svm = v_mask.stride() if num_masks else (0, 0, 0, 0)
    qk_scale = (D ** -0.5 if scale is None else scale) * 1.4426950408889634   # log2(e): softmax in exp2 space
    _block_attention_kernel[(m_tiles, B * Hkv, splits)](
        q, k_cache, v_cache, km, vm, kv_limit, tree_arg, out, o_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *skm, *svm, *kv_limit.stride(), *st, *out.stride(),
        rows, Hkv, group_heads, kv_end, num_clean, num_masks, group_size, splits, qk_scale,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HAS_MASKS=num_masks > 0,
        HAS_TREE=tree is not None, SPLIT=splits > 1,
        IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        _merge_splits_kernel[(m_tiles, B * Hkv)](
            o_part, lse_part, out, *out.stride(), rows, Hkv, group_heads, splits,
            D=D, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return out


def block_attention_triton(q, k_cache, v_cache, kv_limit, k_mask=None, v_mask=None, *, num_clean: int,
                           group_size: int = 1, scale: float | None = None, kv_extent: int | None = None,
                           tree: torch.Tensor | None = None):
    """The Triton kernel, same signature and semantics as ``block_attention_reference``; no host sync.

    ``kv_extent`` here only bounds the cache range (slots >= kv_extent are invisible, as in the reference).
    Launch settings come from the autotune store for this device, else ``default_config``.
    """
    return block_attention_launch(q, k_cache, v_cache, kv_limit, k_mask, v_mask, num_clean=num_clean,
                                  group_size=group_size, scale=scale, kv_extent=kv_extent, tree=tree)


def step_arguments(kv_limit: torch.Tensor, num_clean: int, group_size: int = 1, tree: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32, head_dim: int | None = None) -> dict:
    """``block_attention``'s keyword arguments that every layer of a step shares, built once per step.

    ``kv_limit`` [B, T] covers the step's clean tokens and then its masks (groups of ``group_size``); ``tree`` [B, T]
    (a tree step) their ancestor bitmasks. The reference also gets its extent and visibility mask ready-made: built
    per layer they cost ~0.1 ms a layer on a CPU, more than the attention itself at batch 1. The Triton kernel needs
    neither (and so no host sync), the CPU's C kernel (``kernels.cpu_attention``, for a decode step of ``dtype``
    fp32 and heads of ``head_dim``) only the extent.
    """
    args = {"kv_limit": kv_limit, "num_clean": num_clean, "group_size": group_size, "tree": tree}
    if backend.use_triton():
        return args
    kv_extent = int(kv_limit.max()) + 1
    if head_dim is not None and cpu_attention.serves_step(kv_limit, dtype, head_dim):   # it reads limits, not a mask
        return {**args, "kv_extent": kv_extent}
    num_masks = kv_limit.shape[1] - num_clean
    return {**args, "kv_extent": kv_extent,
            "allowed": visibility(kv_limit, kv_extent, num_clean, num_masks, group_size, tree)}


def tree_bits(ancestors: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool (slot t sees slot i) -> [B, T] int64 bitmasks, bit i for slot i; T <= ``MAX_TREE_SLOTS``."""
    T = ancestors.shape[-1]
    if T > MAX_TREE_SLOTS:
        raise ValueError(f"a tree step holds at most {MAX_TREE_SLOTS} tokens, got {T}")
    return (ancestors.to(torch.int64) << torch.arange(T, device=ancestors.device)).sum(dim=-1)


def block_attention(q, k_cache, v_cache, kv_limit, k_mask=None, v_mask=None, *, num_clean: int, group_size: int = 1,
                    scale: float | None = None, kv_extent: int | None = None, allowed: torch.Tensor | None = None,
                    tree: torch.Tensor | None = None):
    """Dispatch to the active backend (see ``kernels.backend``); on the torch backend a CPU decode step in fp32 runs
    in C (``kernels.cpu_attention``), anything else in the reference."""
    args = (q, k_cache, v_cache, kv_limit, k_mask, v_mask)
    step = {"num_clean": num_clean, "group_size": group_size, "scale": scale, "kv_extent": kv_extent, "tree": tree}
    if backend.use_triton():
        return block_attention_triton(*args, **step)
    if cpu_attention.takes_c_path(q, k_cache, v_cache, kv_limit, k_mask, v_mask, tree):
        return cpu_attention.block_attention(*args, **step)
    return block_attention_reference(*args, **step, allowed=allowed)
