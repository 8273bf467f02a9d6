"""The small per-layer ops of a decode step on a CPU, in C: RMSNorm (alone, or after the residual add), RoPE, and the
KV-cache write.

With the weights streamed by ``kernels.cpu_matmul``, a batch-1 step of the default model spends as long in its ~25
small PyTorch ops per layer as in its products: each costs 5-40 us in the loop (dispatch, and torch's code evicted
from the caches by the weight stream: ``F.rms_norm`` takes ~11 us alone, ~27 us between products), where its
arithmetic takes well under a microsecond for a few rows of 576. One C call per op, without PyTorch's dispatcher,
costs ~1-3 us.

Each op computes what its reference beside it computes, row by row and independently of how many rows share a call,
so a verify row still gets exactly the numbers an autoregressive row gets. RoPE and the cache write give the
reference's bits (the same multiplies and adds, no contraction into FMAs; a copy); RMSNorm sums its squares in 16
partial sums, then pairwise, which need not be the order of torch's reduction (fp32 tolerance against it).

The ops run where their inputs are fp32 on the CPU with nothing for autograd to track and the packed matmul is
available (its switch, $FLEXDRAFT_CPU_MATMUL=0, turns these off too); elsewhere (training, CUDA, bf16) the torch
references run.

Module / reference / test / benchmark: ``rms_norm``, ``add_rms_norm``, ``rope``, ``write_kv`` here, each with its
``*_reference`` beside it; tests/test_kernel_cpu_rowwise.py; tests/bench_kernels.py.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from kernels import cpu_matmul
from kernels.cpu_build import Library, compile_library

LANES = 16   # partial sums of an RMSNorm row: one AVX-512 register, two AVX2 ones

SOURCE = r"""
#include <stdint.h>
#include <string.h>
/* kernels/cpu_rowwise.py: row-wise ops of a decode step (fp32). */
#define LANES %(lanes)d

static float mean_square(const float *x, int64_t K) {
    float s[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES)
        for (int j = 0; j < LANES; j++) s[j] += x[k + j] * x[k + j];
    for (int j = 0; k + j < K; j++) s[j] += x[k + j] * x[k + j];
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) s[j] += s[j + width];
    return s[0] / (float)K;
}

static void normalize(const float *x, int64_t K, const float *w, float eps, float *out) {
    const float r = 1.0f / __builtin_sqrtf(mean_square(x, K) + eps);
    for (int64_t k = 0; k < K; k++) out[k] = w[k] * (x[k] * r);
}

/* out[m] = w * (x[m] / sqrt(mean(x[m]^2) + eps)) */
void rms_norm_f32(const float *x, int64_t M, int64_t K, const float *w, float eps, float *out) {
    for (int64_t m = 0; m < M; m++) normalize(x + m * K, K, w, eps, out + m * K);
}

/* sum = h + d; out = rms_norm(sum) */
void add_rms_norm_f32(const float *h, const float *d, int64_t M, int64_t K, const float *w, float eps, float *sum,
                      float *out) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) sum[m * K + k] = h[m * K + k] + d[m * K + k];
        normalize(sum + m * K, K, w, eps, out + m * K);
    }
}

/* out [R, H, D] = x * cos + roll(x, D / 2) * signed_sin for the first H of x's heads [R, heads, D]; cos and
   signed_sin [R, D] */
void rope_f32(const float *x, int64_t R, int64_t heads, int64_t H, int64_t D, const float *cos,
              const float *signed_sin, float *out) {
    const int64_t half = D / 2;
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < H; h++) {
            const float *xr = x + (r * heads + h) * D, *c = cos + r * D, *s = signed_sin + r * D;
            float *o = out + (r * H + h) * D;
            for (int64_t i = 0; i < half; i++) o[i] = xr[i] * c[i] + xr[i + half] * s[i];
            for (int64_t i = half; i < D; i++) o[i] = xr[i] * c[i] + xr[i - half] * s[i];
        }
}

/* one cache [B, H, S, D] at [b, :, slots[b, t]] = src [b, t] (H x D contiguous, rows at b * stride_b + t * stride_t) */
static void write_rows(float *cache, int64_t H, int64_t S, int64_t D, const float *src, int64_t B, int64_t T,
                       int64_t stride_b, int64_t stride_t, const int64_t *slots) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++)
                memcpy(cache + ((b * H + h) * S + slots[b * T + t]) * D, src + b * stride_b + t * stride_t + h * D,
                       D * sizeof(float));
}

/* k and v into their caches at the same slots; returns -1, writing nothing, where a slot lies outside 0..S-1 */
int write_kv_f32(float *k_cache, float *v_cache, int64_t H, int64_t S, int64_t D, const float *k, const float *v,
                 int64_t B, int64_t T, int64_t k_stride_b, int64_t k_stride_t, int64_t v_stride_b, int64_t v_stride_t,
                 const int64_t *slots) {
    for (int64_t i = 0; i < B * T; i++)
        if (slots[i] < 0 || slots[i] >= S) return -1;
    write_rows(k_cache, H, S, D, k, B, T, k_stride_b, k_stride_t, slots);
    write_rows(v_cache, H, S, D, v, B, T, v_stride_b, v_stride_t, slots);
    return 0;
}
"""

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "rms_norm_f32": ([_P, _I64, _I64, _P, _F32, _P], None),
    "add_rms_norm_f32": ([_P, _P, _I64, _I64, _P, _F32, _P, _P], None),
    "rope_f32": ([_P, _I64, _I64, _I64, _I64, _P, _P, _P], None),
    "write_kv_f32": ([_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P], ctypes.c_int),
}


def _build() -> ctypes.CDLL:
    if not cpu_matmul.available():
        raise RuntimeError(f"the CPU kernels are unavailable: {cpu_matmul.why_unavailable()}")
    # -fno-math-errno: sqrtf is the instruction (no libm call); the same rounding.
    lib = compile_library("cpu_rowwise", SOURCE % {"lanes": LANES},
                          [*cpu_matmul.CFLAGS, *cpu_matmul.ISA.cflags, "-fno-math-errno"])
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


LIBRARY = Library(_build)


def available() -> bool:
    """Whether the C ops run here: where the packed matmul does (x86-64, a C compiler, $FLEXDRAFT_CPU_MATMUL) and this
    library built (a failed build is remembered, and the references run)."""
    return cpu_matmul.available() and LIBRARY.available()


def takes_c_path(*tensors: torch.Tensor) -> bool:
    """Whether these tensors may go through the C ops: fp32 on the CPU, outside autocast, nothing for autograd."""
    if torch.is_autocast_enabled("cpu") or not available():
        return False
    tracked = torch.is_grad_enabled()
    for t in tensors:   # a loop, not all(...): this runs ~150 times a decode step
        if t.dtype is not torch.float32 or not t.is_cpu or (tracked and t.requires_grad):
            return False
    return True


# ---- RMSNorm ---------------------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension."""
    if not takes_c_path(x, weight):
        return rms_norm_reference(x, weight, eps)
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    LIBRARY.get().rms_norm_f32(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], weight.data_ptr(), eps,
                            out.data_ptr())
    return out


def add_rms_norm_reference(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = hidden + delta
    return total, rms_norm_reference(total, weight, eps)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, RMSNorm of it): a residual add and the next norm in one call."""
    if not (takes_c_path(hidden, delta, weight) and hidden.shape == delta.shape):
        return add_rms_norm_reference(hidden, delta, weight, eps)
    hidden, delta, weight = hidden.contiguous(), delta.contiguous(), weight.contiguous()
    total, out = torch.empty_like(hidden), torch.empty_like(hidden)
    LIBRARY.get().add_rms_norm_f32(hidden.data_ptr(), delta.data_ptr(), hidden.numel() // hidden.shape[-1],
                                hidden.shape[-1], weight.data_ptr(), eps, total.data_ptr(), out.data_ptr())
    return total, out


# ---- RoPE ------------------------------------------------------------------------------------------------------------
def rope_reference(heads: torch.Tensor, count: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The first ``count`` heads of ``heads`` [B, T, H, D] rotated, in the Hugging Face (half-split) convention;
    cos and signed_sin [B, T, 1, D], sin with its first half negated (``Transformer.rope``), so that
    rotate_half(x) * sin is x.roll(D/2) * signed_sin (a negation is exact)."""
    x = heads[:, :, :count]
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rope(heads: torch.Tensor, count: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``rope_reference``'s bits: [B, T, count, D]."""
    B, T, H, D = heads.shape
    if not (takes_c_path(heads, cos, signed_sin) and D % 2 == 0 and cos.shape == signed_sin.shape == (B, T, 1, D)):
        return rope_reference(heads, count, cos, signed_sin)
    heads, cos, signed_sin = heads.contiguous(), cos.contiguous(), signed_sin.contiguous()
    out = torch.empty(B, T, count, D)
    LIBRARY.get().rope_f32(heads.data_ptr(), B * T, H, count, D, cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr())
    return out


# ---- the KV-cache write --------------------------------------------------------------------------------------------
def write_kv_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slots: torch.Tensor) -> None:
    """caches [B, H, S, D] at [b, :, slots[b, t]] = k, v [B, T, H, D]."""
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    k_cache[rows, :, slots] = k.to(k_cache.dtype)   # autocast may hand bf16 to an fp32 cache
    v_cache[rows, :, slots] = v.to(v_cache.dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """``write_kv_reference`` as copies, one call for both; k and v may be views whose heads are contiguous (sliced
    from the projected heads), so nothing is copied twice. A slot outside the cache raises IndexError."""
    B, T, H, D = k.shape
    if not (takes_c_path(k_cache, v_cache, k, v) and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.shape == v_cache.shape == (B, H, k_cache.shape[2], D) and v.shape == k.shape
            and k.stride()[2:] == v.stride()[2:] == (D, 1) and slots.shape == (B, T) and slots.dtype == torch.int64
            and slots.is_cpu):
        return write_kv_reference(k_cache, v_cache, k, v, slots)
    slots = slots.contiguous()
    if LIBRARY.get().write_kv_f32(k_cache.data_ptr(), v_cache.data_ptr(), H, k_cache.shape[2], D, k.data_ptr(),
                               v.data_ptr(), B, T, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               slots.data_ptr()) != 0:
        raise IndexError(f"a cache slot outside 0..{k_cache.shape[2] - 1}: {slots.tolist()}")
