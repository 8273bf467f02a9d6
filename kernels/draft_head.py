"""Calibrated draft head: from the mask slots' hidden states to drafts, their probabilities and confidence.

For N mask slots:
  logits = lm_head(rms_norm(hidden)) + calibration([embed(bonus), rms_norm(hidden)])
  calibration(x) = w2 @ silu(w1 @ x + b1) + b2          (Linear 2h -> r, SiLU, Linear r -> V)
then, on q = probabilities(logits) (temperature, top-k, top-p; temperature 1 when greedy):
  tokens     [N]  argmax (greedy) or argmax(q / race_noise) (sampling)
  token_prob [N]  q at the chosen token
  max_prob   [N]  max of q: the confidence that sets the verification length
  probs      [N, V] q itself, only when sampling (speculative sampling needs it); None when greedy
Shapes: hidden [N, h], norm_weight [h], lm_head [V, h], bonus_emb [N, h] or None (no calibration),
calibration = (w1 [r, 2h], b1 [r], w2 [V, r], b2 [V]) or None, race_noise [N, V] when sampling.

The Triton path (``draft_head_triton``, same signature) fuses the head in three launches:
  1. RMSNorm and the calibration's first layer: normed [N, h] and a = silu(w1 @ [emb; normed] + b1) [N, r];
  2. one pass over vocabulary tiles: logits = [W_lm | w2] @ [normed ; a] + b2, per tile reduced to a running
     max, sum of exp and argmax per row (the [N, V] logits are written only when sampling needs them);
  3. per row, merge the tiles: greedy ends here (token = argmax, token_prob = max_prob = 1 / sum exp(l - max));
     sampling with temperature only normalises the stored logits into probs in place and runs the exponential race.
Top-k or top-p sampling writes the calibrated logits from (2) and leaves the distribution and the race to the torch
tail (``probabilities`` and ``sample``): one definition of top-k/top-p for every path.
As in the reference, the lm_head and calibration products are each rounded to the model dtype before they are added.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autotune.store import config_key, lookup
from kernels.backend import check_device
from kernels.cpu_matmul import linear

from flexdraft.sampling import SamplingParams, probabilities, sample


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def calibration_logits(normed, bonus_emb, calibration):
    """The calibration MLP's correction: w2 @ silu(w1 @ [embed(bonus); normed] + b1) + b2 (training uses it too)."""
    w1, b1, w2, b2 = calibration
    x = torch.cat([bonus_emb.to(normed.dtype), normed], dim=-1)
    return linear(F.silu(F.linear(x, w1, b1)), w2, b2, layout="out_in")


def calibrated_logits(hidden, norm_weight, eps, lm_head, bonus_emb=None, calibration=None):
    # The products run in the weights' dtype (a CPU drafter passes bf16 copies: see ``Drafter.head_weights``).
    normed = rms_norm(hidden, norm_weight, eps).to(lm_head.dtype)
    logits = linear(normed, lm_head, layout="out_in")   # few rows on a CPU: the packed kernel
    if calibration is not None and bonus_emb is not None:
        logits = logits + calibration_logits(normed, bonus_emb, calibration)
    return logits


def draft_head_reference(hidden, norm_weight, eps, lm_head, bonus_emb=None, calibration=None, *,
                         params: SamplingParams = SamplingParams(), race_noise=None):
    logits = calibrated_logits(hidden, norm_weight, eps, lm_head, bonus_emb, calibration)
    probs = probabilities(logits, params)
    tokens = probs.argmax(dim=-1) if params.greedy else sample(probs, race_noise)
    token_prob = probs.gather(-1, tokens[..., None]).squeeze(-1)
    max_prob = probs.max(dim=-1).values
    return tokens, token_prob, max_prob, (None if params.greedy else probs)


# ---- Triton kernels --------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 weights: keep fp32 products (tf32 would cost ~1e-3 relative error)
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _norm_calibration_kernel(H, NW, EMB, W1, B1, NORMED, ACT,
                             sh_n, sh_k, se_n, se_k, sw1_r, sw1_k,
                             N, HID, R, eps,
                             BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                             HAS_CALIB: tl.constexpr, IEEE: tl.constexpr):
    """normed = rms_norm(hidden) [N, h]; act = silu(w1 @ [bonus_emb ; normed] + b1) [N, r] (model dtype)."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    dtype = NORMED.dtype.element_ty
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = H + rows.to(tl.int64)[:, None] * sh_n
    sumsq = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, HID, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(h_rows + k[None, :] * sh_k, mask=row_ok[:, None] & (k < HID)[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, 1)
    rstd = tl.math.rsqrt(sumsq / HID + eps)
    if pid_r == 0:
        for k0 in range(0, HID, BLOCK_K):
            k = k0 + offs_k
            ok = row_ok[:, None] & (k < HID)[None, :]
            x = tl.load(h_rows + k[None, :] * sh_k, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(NW + k, mask=k < HID, other=0.0)
            normed = (x * rstd[:, None]).to(dtype) * w[None, :].to(dtype)   # rounded before the weight, as torch
            tl.store(NORMED + rows.to(tl.int64)[:, None] * HID + k[None, :], normed, mask=ok)
    if HAS_CALIB:
        cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        col_ok = cols < R
        acc = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
        for k0 in range(0, HID, BLOCK_K):   # first half of the input: the bonus token's embedding
            k = k0 + offs_k
            e = tl.load(EMB + rows.to(tl.int64)[:, None] * se_n + k[None, :] * se_k,
                        mask=row_ok[:, None] & (k < HID)[None, :], other=0.0).to(dtype)
            w = tl.load(W1 + cols[:, None] * sw1_r + k[None, :] * sw1_k, mask=col_ok[:, None] & (k < HID)[None, :],
                        other=0.0)
            acc += _dot(e, tl.trans(w), IEEE)
        for k0 in range(0, HID, BLOCK_K):   # second half: the normed hidden state (recomputed: no cross-program wait)
            k = k0 + offs_k
            x = tl.load(h_rows + k[None, :] * sh_k, mask=row_ok[:, None] & (k < HID)[None, :], other=0.0)
            nw = tl.load(NW + k, mask=k < HID, other=0.0).to(dtype)
            normed = (x.to(tl.float32) * rstd[:, None]).to(dtype) * nw[None, :]
            w = tl.load(W1 + cols[:, None] * sw1_r + (HID + k)[None, :] * sw1_k,
                        mask=col_ok[:, None] & (k < HID)[None, :], other=0.0)
            acc += _dot(normed, tl.trans(w), IEEE)
        pre = (acc + tl.load(B1 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
        act = (pre * tl.sigmoid(pre)).to(dtype)
        tl.store(ACT + rows.to(tl.int64)[:, None] * R + cols[None, :], act, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _vocab_tile_kernel(NORMED, ACT, LM, W2, B2, LOGITS, PART_M, PART_S, PART_I,
                       slm_v, slm_k, sw2_v, sw2_k,
                       N, HID, R, V, num_vtiles, temperature,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       HAS_CALIB: tl.constexpr, WRITE_LOGITS: tl.constexpr, SCALE: tl.constexpr,
                       IEEE: tl.constexpr):
    """One vocabulary tile: [W_lm | w2] @ [normed ; act] + b2, reduced to (max, sum exp, argmax) per row."""
    pid_n = tl.program_id(0)   # row tiles vary fastest: programs that share a weight tile run together (L2)
    pid_v = tl.program_id(1)
    dtype = LM.dtype.element_ty
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, HID, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(NORMED + rows.to(tl.int64)[:, None] * HID + k[None, :], mask=row_ok[:, None] & (k < HID)[None, :],
                    other=0.0)
        w = tl.load(LM + cols.to(tl.int64)[:, None] * slm_v + k[None, :] * slm_k,
                    mask=col_ok[:, None] & (k < HID)[None, :], other=0.0)
        acc += _dot(a, tl.trans(w), IEEE)
    logits = acc.to(dtype)
    if HAS_CALIB:
        acc2 = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, R, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(ACT + rows.to(tl.int64)[:, None] * R + k[None, :], mask=row_ok[:, None] & (k < R)[None, :],
                        other=0.0)
            w = tl.load(W2 + cols.to(tl.int64)[:, None] * sw2_v + k[None, :] * sw2_k,
                        mask=col_ok[:, None] & (k < R)[None, :], other=0.0)
            acc2 += _dot(a, tl.trans(w), IEEE)
        acc2 += tl.load(B2 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        logits = logits + acc2.to(dtype)
    logits = logits.to(tl.float32)
    if SCALE:
        logits = logits / temperature
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    if WRITE_LOGITS:
        tl.store(LOGITS + rows.to(tl.int64)[:, None] * V + cols[None, :], logits,
                 mask=row_ok[:, None] & col_ok[None, :])
    tile_max = tl.max(logits, 1)
    tile_arg = tl.argmax(logits, 1, tie_break_left=True) + pid_v * BLOCK_V
    tile_sum = tl.sum(tl.exp(logits - tile_max[:, None]), 1)
    part = rows.to(tl.int64) * num_vtiles + pid_v
    tl.store(PART_M + part, tile_max, mask=row_ok)
    tl.store(PART_S + part, tile_sum, mask=row_ok)
    tl.store(PART_I + part, tile_arg, mask=row_ok)


@triton.jit
def _merge_vocab_kernel(PART_M, PART_S, PART_I, PROBS, NOISE, TOKENS, TOKEN_PROB, MAX_PROB,
                        sn_n, sn_v, V, num_vtiles,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, SAMPLE: tl.constexpr,
                        NOISE_FP64: tl.constexpr):
    """Per row: merge the tiles' (max, sum exp, argmax); when sampling, normalise the logits stored in PROBS in
    place and draw argmax(probs / race_noise)."""
    row = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    m = tl.full([], float("-inf"), tl.float32)
    for t0 in range(0, num_vtiles, BLOCK_T):
        t = t0 + offs_t
        m = tl.maximum(m, tl.max(tl.load(PART_M + row * num_vtiles + t, mask=t < num_vtiles,
                                         other=float("-inf")), 0))
    total = tl.full([], 0.0, tl.float32)
    first = tl.full([], V, tl.int32)
    for t0 in range(0, num_vtiles, BLOCK_T):
        t = t0 + offs_t
        ok = t < num_vtiles
        pm = tl.load(PART_M + row * num_vtiles + t, mask=ok, other=float("-inf"))
        total += tl.sum(tl.load(PART_S + row * num_vtiles + t, mask=ok, other=0.0) * tl.exp(pm - m), 0)
        # tiles are in vocabulary order: the smallest index among tiles reaching the max is torch's first argmax
        pi = tl.load(PART_I + row * num_vtiles + t, mask=ok, other=V).to(tl.int32)
        first = tl.minimum(first, tl.min(tl.where(pm == m, pi, V), 0))
    max_prob = 1.0 / total   # softmax at the max logit: exp(0) / sum
    if SAMPLE:
        offs_v = tl.arange(0, BLOCK_V)
        if NOISE_FP64:
            best = tl.full([], -1.0, tl.float64)
        else:
            best = tl.full([], -1.0, tl.float32)
        token = tl.full([], 0, tl.int32)
        token_prob = tl.full([], 0.0, tl.float32)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + offs_v
            ok = v < V
            p = tl.exp(tl.load(PROBS + row * V + v, mask=ok, other=float("-inf")) - m) / total
            tl.store(PROBS + row * V + v, p, mask=ok)
            noise = tl.load(NOISE + row * sn_n + v * sn_v, mask=ok, other=1.0)
            if NOISE_FP64:
                score = p.to(tl.float64) / noise
            else:
                score = tl.div_rn(p, noise.to(tl.float32))
            tile_best = tl.max(score, 0)
            tile_arg = tl.argmax(score, 0, tie_break_left=True)
            take = tile_best > best   # strict: an earlier tile keeps a tie, as torch.argmax does
            token = tl.where(take, v0 + tile_arg, token)
            token_prob = tl.where(take, tl.sum(tl.where(offs_v == tile_arg, p, 0.0), 0), token_prob)
            best = tl.maximum(best, tile_best)
        tl.store(TOKENS + row, token)
        tl.store(TOKEN_PROB + row, token_prob)
    else:
        tl.store(TOKENS + row, first)
        tl.store(TOKEN_PROB + row, max_prob)
    tl.store(MAX_PROB + row, max_prob)


# ---- launch ----------------------------------------------------------------------------------------------------------
def default_config(rows: int) -> dict:
    """Fixed launch settings when nothing is tuned."""
    block_n = 16 if rows <= 16 else 32 if rows <= 32 else 64
    return {"BLOCK_N": block_n, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 8 if block_n >= 64 else 4,
            "num_stages": 3}


def draft_head_launch(hidden, norm_weight, eps, lm_head, bonus_emb=None, calibration=None, *,
                      params: SamplingParams = SamplingParams(), race_noise=None, config: dict | None = None):
    """``draft_head_triton`` with an explicit launch ``config`` (the sweep and the tests use it)."""
    check_device(hidden.device)
    lead, hid = hidden.shape[:-1], hidden.shape[-1]
    hidden = hidden.reshape(-1, hid)
    N, V = hidden.shape[0], lm_head.shape[0]
    dtype, device = lm_head.dtype, hidden.device
    has_calib = calibration is not None and bonus_emb is not None
    cfg = config or lookup("draft_head", config_key(hid, N, 1, dtype), default_config(N), device)
    block_n, block_v, block_k = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    ieee = dtype == torch.float32

    normed = torch.empty((N, hid), dtype=dtype, device=device)
    if has_calib:
        w1, b1, w2, b2 = calibration
        bonus_emb = bonus_emb.reshape(-1, hid)
        r = w1.shape[0]
        act = torch.empty((N, r), dtype=dtype, device=device)
    else:
        w1 = b1 = w2 = b2 = act = bonus_emb = normed   # unused dummies
        r = 0
    block_r = 64
    _norm_calibration_kernel[(triton.cdiv(N, block_n), triton.cdiv(r, block_r) if has_calib else 1)](
        hidden, norm_weight, bonus_emb, w1, b1, normed, act,
        hidden.stride(0), hidden.stride(1), bonus_emb.stride(0), bonus_emb.stride(1),
        w1.stride(0) if has_calib else 0, w1.stride(1) if has_calib else 0,
        N, hid, r, float(eps),
        BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_K=block_k, HAS_CALIB=has_calib, IEEE=ieee, num_warps=4)

    sample_in_kernel = (not params.greedy) and (params.top_k == 0 or params.top_k >= V) and params.top_p >= 1.0
    write_logits = not params.greedy
    num_vtiles = triton.cdiv(V, block_v)
    logits = torch.empty((N, V) if write_logits else (1,), dtype=torch.float32, device=device)
    part_m = torch.empty((N, num_vtiles), dtype=torch.float32, device=device)
    part_s = torch.empty_like(part_m)
    part_i = torch.empty((N, num_vtiles), dtype=torch.int32, device=device)
    _vocab_tile_kernel[(triton.cdiv(N, block_n), num_vtiles)](
        normed, act, lm_head, w2, b2, logits, part_m, part_s, part_i,
        lm_head.stride(0), lm_head.stride(1), w2.stride(0) if has_calib else 0, w2.stride(1) if has_calib else 0,
        N, hid, r, V, num_vtiles, float(params.temperature) if sample_in_kernel else 1.0,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k, HAS_CALIB=has_calib, WRITE_LOGITS=write_logits,
        SCALE=sample_in_kernel, IEEE=ieee, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    if write_logits and not sample_in_kernel:
        # top-k / top-p: the reference's distribution and race on the fused logits
        probs = probabilities(logits, params)
        tokens = sample(probs, race_noise.reshape(N, V))
        token_prob = probs.gather(-1, tokens[:, None]).squeeze(-1)
        max_prob = probs.max(dim=-1).values
    else:
        tokens = torch.empty(N, dtype=torch.int64, device=device)
        token_prob = torch.empty(N, dtype=torch.float32, device=device)
        max_prob = torch.empty(N, dtype=torch.float32, device=device)
        noise = race_noise.reshape(N, V) if sample_in_kernel else part_m
        _merge_vocab_kernel[(N,)](
            part_m, part_s, part_i, logits, noise, tokens, token_prob, max_prob,
            noise.stride(0), noise.stride(1), V, num_vtiles,
            BLOCK_T=min(1024, triton.next_power_of_2(num_vtiles)), BLOCK_V=1024, SAMPLE=sample_in_kernel,
            NOISE_FP64=noise.dtype == torch.float64, num_warps=4)
        probs = logits
    return (tokens.reshape(lead), token_prob.reshape(lead), max_prob.reshape(lead),
            None if params.greedy else probs.reshape(*lead, V))


def draft_head_triton(hidden, norm_weight, eps, lm_head, bonus_emb=None, calibration=None, *,
                      params: SamplingParams = SamplingParams(), race_noise=None):
    """The fused head, same signature and results as ``draft_head_reference`` (see the module docstring)."""
    return draft_head_launch(hidden, norm_weight, eps, lm_head, bonus_emb, calibration, params=params,
                             race_noise=race_noise)


def draft_head(*args, **kwargs):
    """Dispatch to the active backend (see ``kernels.backend``)."""
    from kernels import backend
    if backend.use_triton():
        return draft_head_triton(*args, **kwargs)
    return draft_head_reference(*args, **kwargs)
