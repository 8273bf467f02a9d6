"""A decode step's block attention on a CPU, in C: the semantics of ``kernels.block_attention``'s reference (the
cache up to each query's ``kv_limit``, a tree step's ancestors, a mask's own group), without PyTorch's SDPA.

At batch 1 with the weights streamed by ``kernels.cpu_matmul``, attention through the reference took ~75 us a layer
for one query row (SDPA ~42 us, the rest building the mask's inputs, concatenating the masks, transposing) and
~140-160 us for a speculative step's 9-20 rows: 14-15% of a step, in every mode. One C call walks each query's
visible keys directly. SmolLM2-135M's heads, ~300 cached tokens, warm caches, 2 threads (the decode loop's): one row
22 us against the reference's 55-70, a 9-node tree 98 against 119, a parallel step's 4 tokens and 16 masks 195-220
against 345-355. On one thread (tests/bench_kernels.py, as the tests run) 26 / 141 / 300-415 against 57 / 163 /
265-350: there SDPA's GEMMs win at 20 rows.

Each query row (sequence, query token, query head) has its own list of visible keys: cache slots in order, then its
group's masks. Its scores are dot products per key (partial sums across a vector, then a fixed tree); the softmax
runs in fp32 with its own ``exp`` (a polynomial within 2 ulp, vectorised), its sum in fixed lanes; the values are
summed over the list in blocks of one vector's width, in order. Rows that share a prefix of the cache share the
loads of its blocks, but no row's numbers depend on which rows share the call or on the thread count: a verify row
gets exactly the numbers an autoregressive row gets (fp32 tolerance against the reference, whose SDPA sums in
another order).

It runs where the inputs are fp32 on the CPU with nothing for autograd to track, the other CPU kernels run (their
switch, $FLEXDRAFT_CPU_MATMUL=0, turns this off too), heads are whole vectors (16 floats with AVX-512, 8 with AVX2)
and a step has at most ``MAX_QUERIES`` query tokens a sequence (decode; a long prefill keeps SDPA, which tiles
better): ``takes_c_path`` here, and ``serves_step``, which lets a
step skip building the reference's visibility mask. Elsewhere (training, CUDA, bf16, prefill) the reference runs.

Module / reference / test / benchmark: ``block_attention`` here, ``block_attention_reference`` in
``kernels/block_attention.py``; tests/test_kernel_cpu_attention.py; tests/bench_kernels.py.
"""
from __future__ import annotations

import ctypes

import torch

from kernels import cpu_matmul, cpu_rowwise
from kernels.cpu_build import Library, compile_library

MAX_QUERIES = 128   # query tokens per sequence in a step up to which the C kernel runs (decode; not a long prefill)


def reduction_levels(width: int) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """How ``width`` vectors of partial sums (one key each) become one vector of ``width`` scores: log2(width) levels,
    each pairing vectors and adding the first halves of their segments to the second halves (two shuffles, one add;
    every key's lanes summed in the same tree). Returns each level's (low, high) shuffle indices, and which key each
    lane of the final vector holds."""
    levels, keys = [], [[k] * width for k in range(width)]   # keys[v][lane]: whose partial sum vector v's lane holds
    segment = width
    while segment > 1:
        half, low, high = segment // 2, [], []
        for start in range(0, width, segment):
            for offset in (0, width):     # x's lanes, then y's (y's indices come after x's in a two-vector shuffle)
                low += [offset + start + i for i in range(half)]
                high += [offset + start + half + i for i in range(half)]
        keys = [[(keys[v] + keys[v + 1])[i] for i in low] for v in range(0, len(keys), 2)]
        levels.append((low, high))
        segment = half
    return levels, keys[0]


def source(width: int) -> str:
    """The C source for vectors of ``width`` floats (GCC vector extensions: one AVX-512 register or two AVX2 ones)."""
    levels, lane_keys = reduction_levels(width)
    vector = lambda values: "{" + ", ".join(map(str, values)) + "}"   # noqa: E731
    reduce = []
    for depth, (low, high) in enumerate(levels):
        count = width >> (depth + 1)
        pair = f"{'acc' if depth == 0 else f'r{depth}'}[2 * i], {'acc' if depth == 0 else f'r{depth}'}[2 * i + 1]"
        reduce.append(f"    vec r{depth + 1}[{count}];\n    for (int i = 0; i < {count}; i++)\n"
                      f"        r{depth + 1}[i] = __builtin_shuffle({pair}, (ivec){vector(low)})\n"
                      f"                + __builtin_shuffle({pair}, (ivec){vector(high)});")
    return SOURCE % {"width": width, "reduce": "\n".join(reduce), "final": f"r{len(levels)}[0]",
                     "lane_keys": vector(lane_keys)}


SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* kernels/cpu_attention.py: a step's block attention (fp32). */
#define W %(width)d
#define CHUNK 8   /* query tokens per work item: they share each block of keys and values */
typedef float vec __attribute__((vector_size(4 * W)));
typedef float vec_u __attribute__((vector_size(4 * W), aligned(4)));   /* an unaligned load or store */
typedef int32_t ivec __attribute__((vector_size(4 * W)));
static const int LANE_KEY[W] = %(lane_keys)s;

/* scores[0..W) = q . keys[0..W): each key's products summed lane-wise over D, then across lanes in a fixed tree.
   All W accumulators stay in registers (fully unrolled); a block's missing keys point at zeros. */
static void score_block(const float *q, const float *const *keys, int64_t D, float *scores) {
    vec acc[W];
    #pragma GCC unroll 16
    for (int k = 0; k < W; k++) acc[k] = (vec){0};
    int64_t d = 0;
    for (; d + W <= D; d += W) {
        const vec qd = *(const vec_u *)(q + d);
        #pragma GCC unroll 16
        for (int k = 0; k < W; k++) acc[k] += qd * *(const vec_u *)(keys[k] + d);
    }
    if (d < D) {   /* a head size that is not whole vectors: the rest, zero-padded */
        vec qd = {0};
        memcpy(&qd, q + d, (D - d) * sizeof(float));
        for (int k = 0; k < W; k++) {
            vec kd = {0};
            memcpy(&kd, keys[k] + d, (D - d) * sizeof(float));
            acc[k] += qd * kd;
        }
    }
%(reduce)s
    float lanes[W];
    *(vec_u *)lanes = %(final)s;
    #pragma GCC unroll 16
    for (int l = 0; l < W; l++) scores[LANE_KEY[l]] = lanes[l];
}

/* o[0..D) += sum_i p[i] * values[i][0..D) for i < count: four vectors of D at a time in registers, even and odd i
   summed apart (two chains hide the FMA latency), then added */
static void accumulate_block(const float *p, const float *const *values, int count, int64_t D, float *o) {
    int64_t d = 0;
    for (; d + 4 * W <= D; d += 4 * W) {
        vec a0 = *(vec_u *)(o + d), a1 = *(vec_u *)(o + d + W), a2 = *(vec_u *)(o + d + 2 * W);
        vec a3 = *(vec_u *)(o + d + 3 * W), b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        int i = 0;
        for (; i + 2 <= count; i += 2) {
            const float *u = values[i] + d, *v = values[i + 1] + d;
            const vec wu = (vec){0} + p[i], wv = (vec){0} + p[i + 1];
            a0 += wu * *(const vec_u *)u;
            a1 += wu * *(const vec_u *)(u + W);
            a2 += wu * *(const vec_u *)(u + 2 * W);
            a3 += wu * *(const vec_u *)(u + 3 * W);
            b0 += wv * *(const vec_u *)v;
            b1 += wv * *(const vec_u *)(v + W);
            b2 += wv * *(const vec_u *)(v + 2 * W);
            b3 += wv * *(const vec_u *)(v + 3 * W);
        }
        if (i < count) {
            const float *u = values[i] + d;
            const vec wu = (vec){0} + p[i];
            a0 += wu * *(const vec_u *)u;
            a1 += wu * *(const vec_u *)(u + W);
            a2 += wu * *(const vec_u *)(u + 2 * W);
            a3 += wu * *(const vec_u *)(u + 3 * W);
        }
        *(vec_u *)(o + d) = a0 + b0;
        *(vec_u *)(o + d + W) = a1 + b1;
        *(vec_u *)(o + d + 2 * W) = a2 + b2;
        *(vec_u *)(o + d + 3 * W) = a3 + b3;
    }
    for (; d < D; d += W) {   /* what is left: a vector at a time, the last one zero-padded */
        const int64_t size = (D - d < W ? D - d : W) * sizeof(float);
        vec a = {0};
        memcpy(&a, o + d, size);
        for (int i = 0; i < count; i++) {
            vec v = {0};
            memcpy(&v, values[i] + d, size);
            a += ((vec){0} + p[i]) * v;
        }
        memcpy(o + d, &a, size);
    }
}

/* e^x lane-wise for x <= 0: x = n ln2 + r, |r| <= ln2 / 2 (n rounded by the 1.5 * 2^23 trick), e^r by Cephes'
   expf polynomial, 2^n built in the exponent bits; below -87 it gives ~1e-38 * e^r rather than 0, which a softmax's
   sum cannot see. */
static inline vec exp_nonpositive(vec x) {
    const ivec low = x < (vec){0} - 87.0f;
    x = (vec)(((ivec)x & ~low) | ((ivec)((vec){0} - 87.0f) & low));
    const vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const vec r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    return p * (vec)((__builtin_convertvector(n, ivec) + 127) << 23);
}

/* s[0..n) -> exp(s - max) in place (s has W floats of slack past n); returns their sum (W lanes, then in order) */
static float exponentiate(float *s, int64_t n) {
    float tops[W], top, lanes[W], total = 0.0f;
    for (int l = 0; l < W; l++) tops[l] = s[0];
    for (int64_t i = 0; i + W <= n; i += W)   /* a maximum is exact in any order: W lanes, then across them */
        for (int l = 0; l < W; l++) tops[l] = s[i + l] > tops[l] ? s[i + l] : tops[l];
    for (int64_t i = n / W * W; i < n; i++) tops[0] = s[i] > tops[0] ? s[i] : tops[0];
    top = tops[0];
    for (int l = 1; l < W; l++) top = tops[l] > top ? tops[l] : top;
    vec partial = {0};
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        const vec e = exp_nonpositive(*(vec_u *)(s + i) - top);
        *(vec_u *)(s + i) = e;
        partial += e;
    }
    *(vec_u *)lanes = partial;
    for (int l = 0; l < W; l++) total += lanes[l];
    if (i < n) {   /* the last, partial vector: its lanes past n are computed, not counted */
        for (int64_t j = n; j < i + W; j++) s[j] = 0.0f;
        const vec e = exp_nonpositive(*(vec_u *)(s + i) - top);
        *(vec_u *)(s + i) = e;
        for (int64_t j = i; j < n; j++) total += s[j];
    }
    return total;
}

/* A buffer of at least `bytes` for this thread, kept between calls (grown, never shrunk). */
static void *scratch(int which, size_t bytes) {
    static __thread void *buffers[3];
    static __thread size_t sizes[3];
    if (sizes[which] < bytes) {
        free(buffers[which]);
        buffers[which] = malloc(bytes);
        sizes[which] = buffers[which] ? bytes : 0;
    }
    return buffers[which];
}

/* out [B, T, Hq, D] (contiguous) = attention of q [B, T, Hq, D] (strides sq_*) over the caches [B, Hkv, S, D]
   (strides sc_*, the same for k and v) up to each query's kv_limit (and below kv_extent), a tree step's query seeing
   of the slots from its row's first kv_limit on only those in its bitmask, and a mask query (t >= num_clean) also the
   masks of its group (k_mask / v_mask [B, M, Hkv, D], strides skm_* / svm_*). Returns -1, writing nothing, where a
   kv_limit lies outside 0..S-1, or -2 where memory ran out.

   Work items are (sequence, kv head, CHUNK query tokens). Each query row (token, head of the kv head's group) has its
   own list of visible keys: slots in order, then its group's masks. The slots every token of the item sees (from 0 up
   to the shortest visible prefix, in whole blocks of W) are scored and summed a block at a time for all the item's
   rows, so each block of keys and values is loaded once for them; each row's rest follows alone. A row's numbers are
   the same either way: its scores are per key, and its sums run over the same positions of its own list in the same
   blocks, so they do not depend on the other rows of the call. */
int block_attention_f32(const float *q, int64_t sq_b, int64_t sq_t, int64_t sq_h,
                        const float *k_cache, const float *v_cache, int64_t sc_b, int64_t sc_h,
                        const float *k_mask, int64_t skm_b, int64_t skm_m, int64_t skm_h,
                        const float *v_mask, int64_t svm_b, int64_t svm_m, int64_t svm_h,
                        const int64_t *kv_limit, const int64_t *tree, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
                        int64_t S, int64_t D, int64_t num_clean, int64_t num_masks, int64_t group_size,
                        int64_t kv_extent, float scale, float *out, int threads) {
    for (int64_t i = 0; i < B * T; i++)
        if (kv_limit[i] < 0 || kv_limit[i] >= S) return -1;
    const int64_t group_heads = Hq / Hkv, chunks = (T + CHUNK - 1) / CHUNK;
    const int64_t stride = kv_extent + group_size + W;   /* a row's list: visible keys, masks, a block's padding */
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *scores = scratch(0, CHUNK * group_heads * stride * sizeof(float));
        const float **own_keys = scratch(1, CHUNK * stride * sizeof(float *));
        const float **own_values = scratch(2, CHUNK * stride * sizeof(float *));
        if (!scores || !own_keys || !own_values) failed = 1;
        float *zeros = calloc(D, sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < B * Hkv * chunks; item++) {
            if (failed || !zeros) continue;
            const int64_t b = item / (Hkv * chunks), kv_head = (item / chunks) %% Hkv, t0 = item %% chunks * CHUNK;
            const int64_t tokens = T - t0 < CHUNK ? T - t0 : CHUNK, first_head = kv_head * group_heads;
            const int64_t root = kv_limit[b * T];
            const float *k_rows = k_cache + b * sc_b + kv_head * sc_h, *v_rows = v_cache + b * sc_b + kv_head * sc_h;
            int64_t count[CHUNK], shared = stride;
            for (int64_t u = 0; u < tokens; u++) {   /* the slots every token sees: 0 .. shared - 1 */
                const int64_t limit = kv_limit[b * T + t0 + u] < kv_extent ? kv_limit[b * T + t0 + u] : kv_extent - 1;
                const int64_t prefix = tree && root < limit + 1 ? root : limit + 1;
                shared = prefix < shared ? prefix : shared;
            }
            const int64_t from = shared / W * W;   /* shared whole blocks; each row's own list starts here */
            for (int64_t u = 0; u < tokens; u++) {
                const int64_t t = t0 + u;
                const int64_t limit = kv_limit[b * T + t] < kv_extent ? kv_limit[b * T + t] : kv_extent - 1;
                const uint64_t bits = tree ? (uint64_t)tree[b * T + t] : 0;
                const float **keys = own_keys + u * stride, **values = own_values + u * stride;
                int64_t n = 0;
                for (int64_t j = from; j <= limit; j++) {
                    if (tree && j >= root && !((bits >> (j - root < 63 ? j - root : 63)) & 1)) continue;
                    keys[n] = k_rows + j * D;
                    values[n++] = v_rows + j * D;
                }
                if (t >= num_clean && num_masks) {
                    const int64_t first = (t - num_clean) / group_size * group_size;
                    for (int64_t m = first; m < first + group_size && m < num_masks; m++) {
                        keys[n] = k_mask + b * skm_b + m * skm_m + kv_head * skm_h;
                        values[n++] = v_mask + b * svm_b + m * svm_m + kv_head * svm_h;
                    }
                }
                for (int64_t i = n; i < n + W; i++) keys[i] = zeros;
                count[u] = from + n;
            }
            /* scores: the shared blocks for all rows, then each row's own keys */
            for (int64_t i = 0; i < from; i += W) {
                const float *block[W];
                for (int k = 0; k < W; k++) block[k] = k_rows + (i + k) * D;
                for (int64_t r = 0; r < tokens * group_heads; r++)
                    score_block(q + b * sq_b + (t0 + r / group_heads) * sq_t + (first_head + r %% group_heads) * sq_h,
                                block, D, scores + r * stride + i);
            }
            for (int64_t r = 0; r < tokens * group_heads; r++) {
                const int64_t u = r / group_heads, n = count[u];
                const float *qr = q + b * sq_b + (t0 + u) * sq_t + (first_head + r %% group_heads) * sq_h;
                float *s = scores + r * stride;
                for (int64_t i = from; i < n; i += W) score_block(qr, own_keys + u * stride + (i - from), D, s + i);
                for (int64_t i = 0; i < n; i++) s[i] *= scale;
                const float inverse = n ? 1.0f / exponentiate(s, n) : 0.0f;   /* n = 0: a malformed tree; zeros */
                for (int64_t i = 0; i < n; i++) s[i] *= inverse;
                memset(out + ((b * T + t0 + u) * Hq + first_head + r %% group_heads) * D, 0, D * sizeof(float));
            }
            /* the weighted values, in the same blocks */
            for (int64_t i = 0; i < from; i += W) {
                const float *block[W];
                for (int k = 0; k < W; k++) block[k] = v_rows + (i + k) * D;
                for (int64_t r = 0; r < tokens * group_heads; r++)
                    accumulate_block(scores + r * stride + i, block, W, D,
                                     out + ((b * T + t0 + r / group_heads) * Hq + first_head + r %% group_heads) * D);
            }
            for (int64_t r = 0; r < tokens * group_heads; r++) {
                const int64_t u = r / group_heads, n = count[u];
                float *o = out + ((b * T + t0 + u) * Hq + first_head + r %% group_heads) * D;
                for (int64_t i = from; i < n; i += W)
                    accumulate_block(scores + r * stride + i, own_values + u * stride + (i - from),
                                     n - i < W ? (int)(n - i) : W, D, o);
            }
        }
        free(zeros);
        if (!zeros) failed = 1;
    }
    if (failed) return -2;
    return 0;
}
"""

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I64, _I64, _I64, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _P, _P,
             *[_I64] * 10, ctypes.c_float, _P, ctypes.c_int]
WIDTH_CFLAGS = {16: ("-mavx512f", "-mfma"), 8: ("-mavx2", "-mfma")}   # the vector widths of cpu_matmul's ISAs
LIBRARIES: dict[int, Library] = {}   # by vector width


def _build(width: int) -> ctypes.CDLL:
    # Contraction on (FMAs), unlike the matmul's rebuild: no other code's bits to reproduce here.
    lib = compile_library(f"cpu_attention-{width}", source(width),
                          [*cpu_matmul.CFLAGS, "-ffp-contract=fast", *WIDTH_CFLAGS[width], "-fno-math-errno"])
    lib.block_attention_f32.argtypes, lib.block_attention_f32.restype = _ARGTYPES, ctypes.c_int
    return lib


def _library_for(width: int | None = None) -> Library:
    """The kernel for vectors of ``width`` floats (default: the packed matmul's ISA's), built on first use."""
    width = width or cpu_matmul.ISA.width
    if width not in LIBRARIES:
        LIBRARIES[width] = Library(lambda: _build(width))
    return LIBRARIES[width]


def available() -> bool:
    """Whether the C attention runs here: where the other CPU kernels do, and this CPU's variant built (a failed
    build is remembered, and the reference runs)."""
    return cpu_rowwise.available() and _library_for().available()


def serves_step(kv_limit: torch.Tensor, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a step of ``dtype`` activations with these limits [B, T] and heads of ``head_dim`` will take the C
    kernel (decided before the layers run, so that ``step_arguments`` skips the reference's visibility mask, which it
    would not read)."""
    return (kv_limit.is_cpu and dtype is torch.float32 and kv_limit.shape[1] <= MAX_QUERIES
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and available()
            and head_dim % cpu_matmul.ISA.width == 0)


def takes_c_path(q, k_cache, v_cache, kv_limit, k_mask, v_mask, tree) -> bool:
    """Whether this call may run in C: fp32 CPU tensors with nothing for autograd, few query tokens, heads of whole
    vectors (the kernel zero-pads the rest of other sizes, correctly but 2-4x slower than the reference: the tests'
    tiny models), every head's values contiguous, the caches alike, int64 limits."""
    B, T, Hq, D = q.shape
    if T > MAX_QUERIES or Hq % k_cache.shape[1] or not available() or D % cpu_matmul.ISA.width:
        return False
    tensors = (q, k_cache, v_cache) if k_mask is None else (q, k_cache, v_cache, k_mask, v_mask)
    if not cpu_rowwise.takes_c_path(*tensors) or any(t.stride(-1) != 1 for t in tensors):
        return False
    if k_cache.stride() != v_cache.stride() or k_cache.stride(2) != D or k_cache.shape != v_cache.shape:
        return False
    if k_mask is not None and not (k_mask.shape == v_mask.shape and k_mask.shape[0] == B and k_mask.shape[2:]
                                   == k_cache.shape[1:2] + (D,)):
        return False
    return (kv_limit.dtype is torch.int64 and kv_limit.is_cpu and kv_limit.shape == (B, T)
            and (tree is None or (tree.dtype is torch.int64 and tree.is_cpu and tree.shape == (B, T))))


def block_attention(q, k_cache, v_cache, kv_limit, k_mask=None, v_mask=None, *, num_clean: int,
                    group_size: int = 1, scale: float | None = None, kv_extent: int | None = None,
                    tree: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
    """``block_attention_reference``'s attention [B, T, Hq, D] by the C kernel (callers check ``takes_c_path``).
    A kv_limit outside the cache raises IndexError. ``width``: vectors other than this CPU's (tests, benchmarks)."""
    B, T, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    num_masks = 0 if k_mask is None else k_mask.shape[1]
    kv_extent = S if kv_extent is None else max(1, min(int(kv_extent), S))
    kv_limit = kv_limit.contiguous()
    tree = None if tree is None else tree.contiguous()
    out = torch.empty(B, T, Hq, D)
    masks = (k_mask, *k_mask.stride()[:3], v_mask, *v_mask.stride()[:3]) if num_masks else (q, 0, 0, 0, q, 0, 0, 0)
    status = _library_for(width).get().block_attention_f32(
            q.data_ptr(), *q.stride()[:3], k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.stride()[:2],
            masks[0].data_ptr(), *masks[1:4], masks[4].data_ptr(), *masks[5:8], kv_limit.data_ptr(),
            None if tree is None else tree.data_ptr(), B, T, Hq, Hkv, S, D, num_clean, num_masks,
            max(group_size, 1), kv_extent, D ** -0.5 if scale is None else scale, out.data_ptr(),
            torch.get_num_threads())
    if status == -2:
        raise MemoryError("the C attention's scratch buffers")
    if status != 0:
        raise IndexError(f"a kv_limit outside the cache's 0..{S - 1}")
    return out
