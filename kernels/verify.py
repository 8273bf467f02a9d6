"""Ragged verification of drafts against the target, per sequence with its own number of drafts.

Layout (vLLM's rejection sampler and FlashInfer's ``chain_speculative_sampling``, padded form):
  draft_tokens  [B, n] int64    drafts d_1..d_n per row, only the first ``num_drafts[b]`` are real
  num_drafts    [B]    int64    1 <= num_drafts[b] <= n
  target_argmax [B, n + 1]      (greedy) the target's argmax at each draft position and the one after
  draft_probs   [B, n, V]       (sampling) q, the processed draft distribution at each draft position
  target_probs  [B, n + 1, V]   (sampling) p, the processed target distribution
  uniforms      [B, n]          U(0,1) for the accept tests
  race_noise    [B, V]          Exp(1) noise: the resolved token is argmax(w / E), w = (p - q)+ or p
  kv_len        [B]             cache length before the step (the bonus token's position)
Returns ``(tokens [B, n + 1] padded with -1, accept_len [B], new_kv_len [B])``: the accepted drafts followed by the
resolved token (a correction or a bonus), and the cache length after keeping ``[bonus, d_1..d_a]``.

The Triton kernels (``verify_greedy_triton``, ``verify_sampling_triton``, same signatures) run one program per
sequence, take all random numbers as inputs and never sync with the host. Their results equal the reference's exactly:
the accept test and the race are computed in the dtypes torch's type promotion gives the reference (float64 when the
random numbers are float64), with IEEE-rounded division and torch's first-index tie-break.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from autotune.store import config_key, lookup
from kernels.backend import check_device


def _leading_accepts(accepted: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """Length of the all-accepted prefix, counting only real drafts."""
    n = accepted.shape[1]
    real = torch.arange(n, device=accepted.device)[None, :] < num_drafts[:, None]
    return (accepted & real).to(torch.int64).cumprod(dim=1).sum(dim=1)


def _assemble(draft_tokens, accept_len, resolved, kv_len):
    B, n = draft_tokens.shape
    pos = torch.arange(n + 1, device=draft_tokens.device)[None, :]
    padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    tokens = torch.where(pos < accept_len[:, None], padded, torch.full_like(padded, -1))
    tokens = tokens.scatter(1, accept_len[:, None], resolved[:, None])
    return tokens, accept_len, kv_len + accept_len + 1


def verify_greedy_reference(draft_tokens, num_drafts, target_argmax, kv_len):
    accept_len = _leading_accepts(draft_tokens == target_argmax[:, :-1], num_drafts)
    resolved = target_argmax.gather(1, accept_len[:, None]).squeeze(1)
    return _assemble(draft_tokens, accept_len, resolved, kv_len)


def verify_sampling_reference(draft_tokens, num_drafts, draft_probs, target_probs, uniforms, race_noise, kv_len):
    """Standard speculative sampling: accept d_i with prob min(1, p/q); on the first rejection draw from (p - q)+;
    when all real drafts pass, draw the bonus from p. The output is distributed exactly as sampling p."""
    safe_tokens = draft_tokens.clamp(min=0)
    p_draft = target_probs[:, :-1].gather(2, safe_tokens[..., None]).squeeze(2)
    q_draft = draft_probs.gather(2, safe_tokens[..., None]).squeeze(2)
    # u < p/q without dividing: q > 0 for any token the draft actually sampled.
    accepted = uniforms * q_draft < p_draft
    accept_len = _leading_accepts(accepted, num_drafts)
    B, n, V = draft_probs.shape
    p_at = target_probs.gather(1, accept_len[:, None, None].expand(B, 1, V)).squeeze(1)
    q_padded = torch.cat([draft_probs, draft_probs.new_zeros(B, 1, V)], dim=1)
    q_at = q_padded.gather(1, accept_len[:, None, None].expand(B, 1, V)).squeeze(1)
    all_accepted = (accept_len == num_drafts)[:, None]
    weights = torch.where(all_accepted, p_at, (p_at - q_at).clamp(min=0))
    # A rejection with (p - q)+ all zero cannot happen in exact arithmetic; fall back to p against rounding.
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, p_at)
    resolved = (weights / race_noise).argmax(dim=1)
    return _assemble(draft_tokens, accept_len, resolved, kv_len)


# ---- Triton kernels --------------------------------------------------------------------------------------------------
@triton.jit
def _leading_accept_len(accepted, i, num_drafts, n, BLOCK: tl.constexpr):
    """Length of the all-accepted prefix over real drafts (i < num_drafts); lanes i >= n count as rejections."""
    passed = accepted & (i < num_drafts) & (i < n)
    return tl.min(tl.where(passed, BLOCK, i), 0)


@triton.jit
def _write_tokens(TOKENS, ACCEPT_LEN, NEW_KV_LEN, KV_LEN, b, drafts, i, accept_len, resolved, n,
                  st_b, st_i, skv):
    """tokens[b] = [d_1..d_a, resolved, -1 ...]; accept_len[b] = a; new_kv_len[b] = kv_len[b] + a + 1."""
    out = tl.where(i < accept_len, drafts, tl.where(i == accept_len, resolved, -1))
    tl.store(TOKENS + b * st_b + i * st_i, out.to(TOKENS.dtype.element_ty), mask=i < n + 1)
    tl.store(ACCEPT_LEN + b, accept_len.to(ACCEPT_LEN.dtype.element_ty))
    kv = tl.load(KV_LEN + b * skv)
    tl.store(NEW_KV_LEN + b, (kv + accept_len + 1).to(NEW_KV_LEN.dtype.element_ty))


@triton.jit
def _verify_greedy_kernel(DRAFTS, NUM_DRAFTS, TARGET_ARGMAX, KV_LEN, TOKENS, ACCEPT_LEN, NEW_KV_LEN,
                          sd_b, sd_i, snd, sa_b, sa_i, skv, st_b, st_i, n, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    drafts = tl.load(DRAFTS + b * sd_b + i * sd_i, mask=i < n, other=-1)
    target = tl.load(TARGET_ARGMAX + b * sa_b + i * sa_i, mask=i < n, other=-1)
    accept_len = _leading_accept_len(drafts == target, i, tl.load(NUM_DRAFTS + b * snd), n, BLOCK)
    resolved = tl.load(TARGET_ARGMAX + b * sa_b + accept_len * sa_i)
    _write_tokens(TOKENS, ACCEPT_LEN, NEW_KV_LEN, KV_LEN, b, drafts, i, accept_len, resolved, n, st_b, st_i, skv)


@triton.jit
def _as_float(x, FP64: tl.constexpr):
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _divide(x, y, FP64: tl.constexpr):
    """x / y rounded as torch rounds it (IEEE round-to-nearest; triton's default fp32 division is approximate)."""
    if FP64:
        return x.to(tl.float64) / y.to(tl.float64)
    else:
        return tl.div_rn(x.to(tl.float32), y.to(tl.float32))


@triton.jit
def _verify_sampling_kernel(DRAFTS, NUM_DRAFTS, Q, P, U, NOISE, KV_LEN, TOKENS, ACCEPT_LEN, NEW_KV_LEN,
                            sd_b, sd_i, snd, sq_b, sq_i, sq_v, sp_b, sp_i, sp_v, su_b, su_i, se_b, se_v, skv,
                            st_b, st_i, n, V,
                            BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
                            PROD_FP64: tl.constexpr, CMP_FP64: tl.constexpr, W_FP64: tl.constexpr,
                            SCORE_FP64: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    in_n = i < n
    drafts = tl.load(DRAFTS + b * sd_b + i * sd_i, mask=in_n, other=-1)
    safe = tl.maximum(drafts, 0).to(tl.int64)
    p_draft = tl.load(P + b * sp_b + i * sp_i + safe * sp_v, mask=in_n, other=0.0)
    q_draft = tl.load(Q + b * sq_b + i * sq_i + safe * sq_v, mask=in_n, other=0.0)
    u = tl.load(U + b * su_b + i * su_i, mask=in_n, other=1.0)
    # accept d_i iff u * q < p (no division: q > 0 wherever the draft sampled), in the reference's dtypes
    u_times_q = _as_float(u, PROD_FP64) * _as_float(q_draft, PROD_FP64)
    accepted = _as_float(u_times_q, CMP_FP64) < _as_float(p_draft, CMP_FP64)
    num_drafts = tl.load(NUM_DRAFTS + b * snd)
    accept_len = _leading_accept_len(accepted, i, num_drafts, n, BLOCK)
    all_accepted = accept_len == num_drafts

    # The resolved token: the race argmax(w / E) with w = p (all accepted: the bonus) or (p - q)+ (a correction).
    # Both races run in the same pass; p's wins only if (p - q)+ is all zero, the reference's guard against rounding.
    offs_v = tl.arange(0, BLOCK_V)
    p_row = P + b * sp_b + accept_len * sp_i
    q_row = Q + b * sq_b + accept_len * sq_i
    if SCORE_FP64:
        best_w = tl.full([], -1.0, tl.float64)
    else:
        best_w = tl.full([], -1.0, tl.float32)
    best_p = best_w
    token_w = tl.full([], 0, tl.int32)
    token_p = tl.full([], 0, tl.int32)
    any_w = tl.full([], 0, tl.int32)
    # q at the resolved position is only read on a rejection (when all drafts pass it may not even exist: a = n)
    q_end = tl.where(all_accepted, 0, V)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs_v
        ok = v < V
        p = _as_float(tl.load(p_row + v * sp_v, mask=ok, other=0.0), W_FP64)
        q = _as_float(tl.load(q_row + v * sq_v, mask=v < q_end, other=0.0), W_FP64)
        w = tl.where(all_accepted, p, tl.maximum(p - q, 0.0))
        noise = tl.load(NOISE + b * se_b + v * se_v, mask=ok, other=1.0)
        score = tl.where(ok, _divide(w, noise, SCORE_FP64), -1.0)
        tile_best = tl.max(score, 0)
        take = tile_best > best_w   # strict: an earlier tile keeps a tie, as torch.argmax does
        token_w = tl.where(take, v0 + tl.argmax(score, 0, tie_break_left=True), token_w)
        best_w = tl.maximum(best_w, tile_best)
        score = tl.where(ok, _divide(p, noise, SCORE_FP64), -1.0)
        tile_best = tl.max(score, 0)
        take = tile_best > best_p
        token_p = tl.where(take, v0 + tl.argmax(score, 0, tie_break_left=True), token_p)
        best_p = tl.maximum(best_p, tile_best)
        any_w = tl.maximum(any_w, tl.max((w > 0).to(tl.int32), 0))
    resolved = tl.where(any_w > 0, token_w, token_p)
    _write_tokens(TOKENS, ACCEPT_LEN, NEW_KV_LEN, KV_LEN, b, drafts, i, accept_len, resolved, n, st_b, st_i, skv)


# ---- launch ----------------------------------------------------------------------------------------------------------
def _outputs(draft_tokens, kv_len):
    B, n = draft_tokens.shape
    tokens = torch.empty((B, n + 1), dtype=draft_tokens.dtype, device=draft_tokens.device)
    accept_len = torch.empty(B, dtype=torch.int64, device=draft_tokens.device)
    new_kv_len = torch.empty(B, dtype=torch.promote_types(kv_len.dtype, torch.int64), device=draft_tokens.device)
    return tokens, accept_len, new_kv_len


def verify_greedy_triton(draft_tokens, num_drafts, target_argmax, kv_len):
    """Greedy verification, one program per sequence; equals ``verify_greedy_reference``."""
    check_device(draft_tokens.device)
    B, n = draft_tokens.shape
    tokens, accept_len, new_kv_len = _outputs(draft_tokens, kv_len)
    _verify_greedy_kernel[(B,)](
        draft_tokens, num_drafts, target_argmax, kv_len, tokens, accept_len, new_kv_len,
        *draft_tokens.stride(), num_drafts.stride(0), *target_argmax.stride(), kv_len.stride(0), *tokens.stride(),
        n, BLOCK=triton.next_power_of_2(n + 1), num_warps=1)
    return tokens, accept_len, new_kv_len


def default_config(vocab: int) -> dict:
    return {"BLOCK_V": 2048 if vocab >= 32768 else 1024, "num_warps": 8 if vocab >= 32768 else 4}


def verify_sampling_launch(draft_tokens, num_drafts, draft_probs, target_probs, uniforms, race_noise, kv_len, *,
                           config: dict | None = None):
    """``verify_sampling_triton`` with an explicit launch ``config`` (the sweep and the tests use it)."""
    check_device(draft_tokens.device)
    B, n = draft_tokens.shape
    V = target_probs.shape[-1]
    cfg = config or lookup("verify_sampling", config_key(V, n + 1, B, target_probs.dtype), default_config(V),
                           target_probs.device)
    tokens, accept_len, new_kv_len = _outputs(draft_tokens, kv_len)
    fp64 = torch.float64
    prod = torch.promote_types(uniforms.dtype, draft_probs.dtype)           # u * q
    weights = torch.promote_types(target_probs.dtype, draft_probs.dtype)    # (p - q)+
    _verify_sampling_kernel[(B,)](
        draft_tokens, num_drafts, draft_probs, target_probs, uniforms, race_noise, kv_len,
        tokens, accept_len, new_kv_len,
        *draft_tokens.stride(), num_drafts.stride(0), *draft_probs.stride(), *target_probs.stride(),
        *uniforms.stride(), *race_noise.stride(), kv_len.stride(0), *tokens.stride(), n, V,
        BLOCK=triton.next_power_of_2(n + 1), BLOCK_V=cfg["BLOCK_V"],
        PROD_FP64=prod == fp64, CMP_FP64=torch.promote_types(prod, target_probs.dtype) == fp64,
        W_FP64=weights == fp64, SCORE_FP64=torch.promote_types(weights, race_noise.dtype) == fp64,
        num_warps=cfg["num_warps"])
    return tokens, accept_len, new_kv_len


def verify_sampling_triton(draft_tokens, num_drafts, draft_probs, target_probs, uniforms, race_noise, kv_len):
    """Speculative-sampling verification, one program per sequence; equals ``verify_sampling_reference``.
    Probabilities in float32 or float64 (what ``probabilities`` gives); fp16/bf16 ones are compared in float32."""
    return verify_sampling_launch(draft_tokens, num_drafts, draft_probs, target_probs, uniforms, race_noise, kv_len)


def verify_greedy(*args, **kwargs):
    """Dispatch to the active backend (see ``kernels.backend``)."""
    from kernels import backend
    if backend.use_triton():
        return verify_greedy_triton(*args, **kwargs)
    return verify_greedy_reference(*args, **kwargs)


def verify_sampling(*args, **kwargs):
    """Dispatch to the active backend (see ``kernels.backend``)."""
    from kernels import backend
    if backend.use_triton():
        return verify_sampling_triton(*args, **kwargs)
    return verify_sampling_reference(*args, **kwargs)
