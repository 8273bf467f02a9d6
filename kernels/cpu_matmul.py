"""Few-row products on an x86 CPU: ``x [M, K] @ W`` for M = 1..~64 fp32 rows against a weight packed once (fp32; bf16
for half the bytes; or the GGUF blocks it was dequantised from: each weight rebuilt exactly in registers, so the sums
are the fp32 ones either way).

Decoding on a CPU multiplies a handful of rows (the batch, or a verify block of bonus + drafts, or the mask tokens)
by weights streamed from DRAM. Memory bandwidth is the floor there: up to ~8 rows the product should cost what one
row costs. BLAS does not get there: measured on an AVX2 EPYC, 1 thread, twelve 576 x 3072 weights (85 MB), MKL's
``x @ W`` takes 7 ms for 1 row but 34 ms for 4 and 40 ms for 16; the old small-N workaround ``W^T @ x^T`` 14 / 31 ms.
It repacks the weight on every call, which costs more than the product. This kernel packs the weight once, tile-major
``[N/16, K, 16]``, so each 16-column tile streams contiguously through cache once while up to 6 rows (12 AVX2
accumulators) consume it: 8.7 ms for 4 rows, 18 ms for 16 (~58 GFLOP/s, MKL's large-GEMM peak on that core).
Where the CPU has AVX-512, a variant with twice the register width and twice the registers takes up to 12 rows per
pass (``ISAS``): many-row products (a batch, a parallel step's mask tokens) are FMA-bound, not bandwidth-bound.

Every output element is a plain sum over k = 0..K-1 in order, whatever M is and whichever rows share a call, so a
row's result does not depend on its batch: a verify pass over [bonus, drafts] gives the bonus exactly the logits a
one-row autoregressive step gives it.

Weights whose values are dequantised GGUF blocks pack as those blocks (``pack_blocks``): the default model ships as a
GGUF whose layers are Q4_1 (per block of 32 along K, ``w = d * q + m``, fp16 d and m, q in 0..15: 0.625 bytes a
weight packed, against 4) and whose tied lm_head is Q8_0 (``w = d * q``, q in -128..127: 1.0625 bytes). The kernel
rebuilds each weight in registers to the dequantisation's own value (``d * q + m`` as one FMA: ``d * q`` is exact,
so one rounding equals the dequantisation's two), so it multiplies the very fp32 values and its outputs are bit for
bit the fp32 packing's; a model gives the same tokens either way. With ~5x fewer bytes to stream, a one-row pass is
bound by the rebuilding rather than by DRAM. Only few rows take it (``BLOCKS_MAX_ROWS``): more rows would rebuild
the weights once per 12 rows.

bf16 weights serve the draft head (bf16 copies of its vocabulary rows: on the Xeon, 3 slots' head products took
1.5 ms here against 2.7 ms in torch's bf16 GEMM, caches cold) and any fp32 weight whose values are all bf16 values
(a drafter's projectors, saved in bf16): packed as bf16, those give the fp32 packing's very bits.

The C source is generated below (one function per row count, accumulators as named locals: GCC spills an array of
them), compiled with the system C compiler on first use into the cache and loaded with ctypes (``kernels.cpu_build``).
Where that cannot work (no compiler, no AVX2/FMA, not x86-64) ``available()`` is False, says why, and callers use
torch.
$FLEXDRAFT_CPU_MATMUL_ISA=avx2 keeps an AVX-512 CPU on the AVX2 variant.

Module / reference / test / benchmark: ``few_rows_matmul`` here, ``few_rows_matmul_reference`` beside it,
tests/test_kernel_cpu_matmul.py, tests/bench_kernels.py.
"""
from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.cpu_build import compile_library

TILE = 16   # output columns per tile of the packed layout: two AVX2 registers, or one AVX-512 register
WEIGHT_C_TYPES = {"f32": "float", "bf16": "uint16_t", "q4": "uint8_t", "q8": "int8_t"}   # rows are fp32 either way
# A packing's dtype names its format: Q4_1 blocks are uint8 bytes, Q8_0 blocks int8 ones.
WEIGHT_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.uint8: "q4", torch.int8: "q8"}
# GGUF block packings, per (tile, block of BLOCK along K): 16 fp16 scales d (Q4_1: then 16 fp16 minimums m; GGUF
# stores both as fp16, and widening is exact), then rows of 16 bytes, column j's q in byte j: Q8_0 one k per row
# (int8), Q4_1 two (k in the low nibble, k + 1 high). fp16 scales stream 0.625 bytes a Q4_1 weight, not 0.75.
BLOCK = 32
SCALE_BYTES = 2
BLOCK_BYTES = {"q4": 2 * TILE * SCALE_BYTES + BLOCK * TILE // 2, "q8": TILE * SCALE_BYTES + BLOCK * TILE}
# Rows up to which products take a block packing where a weight has one: a pass rebuilds the weights for up to 12
# rows, so more rows rebuild them again per 12 and the fp32 packing's plain loads win.
BLOCKS_MAX_ROWS = 12
# $FLEXDRAFT_CPU_MATMUL_BLOCKS=0: fp32 packings only (the same bits; to compare their speed)
USE_BLOCKS = os.environ.get("FLEXDRAFT_CPU_MATMUL_BLOCKS", "1") != "0"
# bf16 weights take the kernel up to this many rows; beyond, the kernel's fp32 FMAs lose to native bf16 GEMMs (AMX).
BF16_MAX_ROWS = 12


@dataclass(frozen=True)
class Isa:
    """One instruction set the kernel is generated for. Every variant computes each output as the same in-order FMA
    chain over k, so all of them give bit-identical results; they differ only in how many columns and rows one pass
    keeps in registers."""
    name: str
    cpu_flags: frozenset
    cflags: tuple
    width: int                 # floats per vector register
    max_rows: int              # rows per pass over a tile: accumulators + weight registers + a broadcast fit the file
    tiles_per_pass: dict       # fewer rows leave FMA latency exposed, so they take several tiles per pass
    packed_max_rows: int       # inference products of up to this many rows take this kernel rather than BLAS

    @property
    def vector(self) -> str:
        return "__m256" if self.width == 8 else "__m512"

    @property
    def op(self) -> str:
        return "_mm256" if self.width == 8 else "_mm512"


ISAS = {
    # 16 ymm registers: 6 rows x 2 halves = 12 accumulators, 2 weight registers, 1 broadcast.
    # Faster than MKL at every count from 1 to 128 rows, at 1 and 2 threads (AVX2 EPYC).
    "avx2": Isa("avx2", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c"), 8, 6, {1: 3, 2: 2}, 128),
    # 32 zmm registers: up to 12 rows x 2 tiles = 24 accumulators, 2 weight registers, 1 broadcast. On a core with
    # full-width AVX-512 units this doubles the FLOPs per cycle of the compute-bound passes (many rows). On the
    # AVX512-BF16 EPYC it ran 1.8-2.8x MKL's fp32 GEMM at 64-8192 rows (576x3072, 1536x576, 1 thread), so it takes
    # prefill too (MKL seems to run its AVX2 code on that AMD CPU).
    "avx512": Isa("avx512", frozenset({"avx512f"}), ("-mavx512f", "-mfma"), 16, 12,
                  {1: 4, 2: 4, 3: 3, **{r: 2 for r in range(4, 13)}}, 8192),
}
# Block passes hold a tile's scales and its rebuilt weights besides the accumulators: fewer tiles per pass.
BLOCK_TILES_PER_PASS = {"avx2": {1: 2, 2: 2}, "avx512": {1: 4, 2: 4, 3: 3, **{r: 2 for r in range(4, 9)}}}
# No contraction of a multiply and an add into an FMA where the compiler sees one: every FMA the kernels run is
# written out (the Q4_1 rebuild's d * q + m is one, exact only because d * q is; see _pass_function_blocks).
CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off"]


def few_rows_matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ weight [K, N]``."""
    return x @ weight


def _in_out(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The weight as [K, N] (detached; a view of an ``out_in`` weight), N checked to be whole tiles."""
    w = weight.detach()
    if layout == "out_in":
        w = w.t()
    elif layout != "in_out":
        raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}")
    if w.shape[1] % TILE:
        raise ValueError(f"the packed kernel needs a multiple of {TILE} output columns, got {w.shape[1]}")
    return w


def pack(weight: torch.Tensor, layout: str = "in_out") -> torch.Tensor:
    """``[N/16, K, 16]`` contiguous from a weight stored [K, N] (``in_out``) or [N, K] (``out_in``, PyTorch's
    ``F.linear`` layout, e.g. an lm_head).

    bf16 stays bf16 (half the bytes to stream), and so does an fp32 weight whose every value is a bf16 value (a bf16
    checkpoint run in fp32, such as a drafter's projectors): the kernel widens each weight back exactly, so its
    products are bit for bit those of the fp32 copy. Anything else becomes fp32."""
    w = _in_out(weight, layout)
    K, N = w.shape
    w = w if w.dtype == torch.bfloat16 else w.float()
    if w.dtype == torch.float32 and torch.equal(w, w.bfloat16().float()):
        w = w.bfloat16()
    return w.reshape(K, N // TILE, TILE).permute(1, 0, 2).contiguous()


def block_values(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(q [K, N], d [K/32, N], m [K/32, N] or None) with ``weight [K, N]`` exactly the dequantised GGUF blocks,
    blocks of 32 along K: Q4_1 (``kind="q4"``) ``d * q + m``, q in 0..15, multiply then add in fp32; Q8_0
    (``"q8"``) ``d * q``, q in -128..127. d and m are fp16 values. None where the weight is not of that form.

    Q4_1 sets m to a block's minimum (q = 0 there) and d to (maximum - minimum) / 15, Q8_0 d to the largest
    magnitude / 127; the candidates for d are the fp16 values next to that, and every weight is then checked."""
    K, N = weight.shape
    if weight.dtype != torch.float32 or K % BLOCK or not torch.isfinite(weight).all():
        return None
    blocks = weight.reshape(K // BLOCK, BLOCK, N)
    if kind == "q4":
        m, levels, low, high = blocks.amin(dim=1), 15, 0, 15
        if not torch.equal(m, m.half().float()):
            return None
        span = (blocks.amax(dim=1) - m) / levels
    else:
        m, low, high = None, -128, 127
        span = blocks.abs().amax(dim=1) / 127
    offset = 0 if m is None else m[:, None]
    nearest = span.half()
    d, q = torch.zeros_like(span), torch.zeros(blocks.shape, dtype=torch.int16)
    found = span == 0                                       # a constant block: d 0, q 0
    for step in (0, -1, 1, -2, 2):                          # fp16 neighbours, in ulps
        if bool(found.all()):
            break
        cand = (nearest.view(torch.int16) + step).view(torch.float16).float() if step else nearest.float()
        cand = torch.where(torch.isfinite(cand) & (cand > 0), cand, torch.ones_like(cand))
        cand_q = ((blocks - offset) / cand[:, None]).round().clamp(low, high)
        rebuilt = cand[:, None] * cand_q   # then the add apart: two roundings, as the dequantisation made them
        rebuilt = rebuilt + offset
        ok = (rebuilt == blocks).all(dim=1) & ~found
        d = torch.where(ok, cand, d)
        q = torch.where(ok[:, None], cand_q.to(torch.int16), q)
        found |= ok
    return (q.reshape(K, N), d, m) if bool(found.all()) else None


def pack_blocks(weight: torch.Tensor, kind: str, layout: str = "in_out") -> torch.Tensor | None:
    """The GGUF block packing ``[N/16, K/32, BLOCK_BYTES[kind]]`` (Q4_1: uint8, Q8_0: int8) of a weight whose values
    are those blocks' (``block_values``; ``layout`` as for ``pack``), or None."""
    w = _in_out(weight, layout)
    K, N = w.shape
    values = block_values(w, kind)
    if values is None:
        return None
    q, d, m = values
    tiles, blocks = N // TILE, K // BLOCK
    scales = torch.stack([d] if m is None else [d, m], dim=1).half()        # [blocks, 1 or 2, N]; fp16 values
    scales = scales.reshape(blocks, -1, tiles, TILE).permute(2, 0, 1, 3).contiguous().view(torch.uint8)
    if kind == "q4":
        q = q.to(torch.uint8).reshape(blocks, BLOCK // 2, 2, tiles, TILE)
        q = q[:, :, 0] | (q[:, :, 1] << 4)
    q = q.to(torch.int8 if kind == "q8" else torch.uint8).reshape(blocks, -1, tiles, TILE).permute(2, 0, 1, 3)
    return torch.cat([scales.reshape(tiles, blocks, -1), q.reshape(tiles, blocks, -1).view(torch.uint8)],
                     dim=2).view(torch.int8 if kind == "q8" else torch.uint8).contiguous()


def unpack_blocks(packed: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [K, N] a block packing holds (Q4_1 ``d * q + m``, multiply then add; Q8_0 ``d * q``):
    ``pack_blocks``' inverse."""
    kind, (tiles, blocks, _) = WEIGHT_DTYPES[packed.dtype], packed.shape
    num_scales = 2 if kind == "q4" else 1
    raw = packed.view(torch.uint8)
    scales = raw[:, :, :num_scales * TILE * SCALE_BYTES].contiguous().view(torch.float16).float().reshape(
        tiles, blocks, num_scales, 1, TILE)
    body = packed[:, :, num_scales * TILE * SCALE_BYTES:]
    if kind == "q4":
        nibbles = body.reshape(tiles, blocks, BLOCK // 2, 1, TILE)
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=3)
    else:
        q = body
    w = scales[:, :, 0] * q.reshape(tiles, blocks, BLOCK, TILE).float()
    if kind == "q4":
        w = w + scales[:, :, 1]
    return w.permute(1, 2, 0, 3).reshape(blocks * BLOCK, tiles * TILE)


def few_rows_matmul(x: torch.Tensor, packed: torch.Tensor, threads: int | None = None,
                    isa: Isa | None = None) -> torch.Tensor:
    """``x [..., K] @ W`` for W packed by ``pack`` (fp32 or bf16) or ``pack_blocks``, x fp32 on the CPU; returns fp32
    [..., N], summed in fp32. ``isa``: a variant other than the one chosen for this CPU (tests, benchmarks).
    Called ~120 times a decode step, so it stays lean: a few microseconds of Python around the C call."""
    kind = WEIGHT_DTYPES.get(packed.dtype)
    tiles, K = packed.shape[0], packed.shape[1] * (BLOCK if kind in BLOCK_BYTES else 1)
    if x.shape[-1] != K or x.dtype is not torch.float32 or kind is None or not x.is_cpu:
        raise ValueError(f"few_rows_matmul takes fp32 CPU rows and packed weights with K = {K}; got x "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}, weights {packed.dtype}")
    rows = x if x.is_contiguous() else x.contiguous()
    M = rows.numel() // K
    out = torch.empty(*x.shape[:-1], tiles * TILE)
    run = _runners(isa)[kind]
    run(rows.data_ptr(), M, K, packed.data_ptr(), out.data_ptr(), tiles * TILE, threads or torch.get_num_threads())
    return out


# ---- the dispatcher: products of the model and the draft head --------------------------------------------------
def _cached(weight: torch.Tensor, layout: str, attribute: str, make) -> torch.Tensor | None:
    """``make(weight, layout)``, kept on the weight as ``attribute`` and remade when the weight changes in place."""
    key = (weight._version, weight.data_ptr(), layout)
    cached = getattr(weight, attribute, None)
    if cached is None or cached[0] != key:
        cached = (key, make(weight, layout))
        setattr(weight, attribute, cached)
    return cached[1]


def packed_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The weight packed for ``few_rows_matmul``, made once."""
    return _cached(weight, layout, "_packed", pack)


def _fewest_bytes_blocks(weight: torch.Tensor, layout: str) -> torch.Tensor | None:
    columns = weight.shape[1] if layout == "in_out" else weight.shape[0]
    if columns % TILE:
        return None
    return next((packed for kind in BLOCK_BYTES if (packed := pack_blocks(weight, kind, layout)) is not None), None)


def block_packing(weight: torch.Tensor, layout: str) -> torch.Tensor | None:
    """The fewest-bytes GGUF block packing an fp32 weight has (Q4_1, else Q8_0), or None; found once."""
    if weight.dtype != torch.float32 or not USE_BLOCKS:
        return None
    return _cached(weight, layout, "_packed_blocks", _fewest_bytes_blocks)


def takes_packed_path(x: torch.Tensor, weight: torch.Tensor, columns: int) -> bool:
    """Whether ``x @ weight`` may run in the packed CPU kernel: a product of few rows, fp32 (or bf16 weights with
    rows of their dtype or fp32), not under autocast, and nothing for autograd to track (the kernel has no
    backward)."""
    if (not x.is_cpu or columns % TILE or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or not available()):
        return False
    rows = x.numel() // x.shape[-1]
    if weight.dtype is torch.float32:
        return x.dtype is torch.float32 and rows <= ISA.packed_max_rows
    return weight.dtype is torch.bfloat16 and x.dtype in (torch.bfloat16, torch.float32) and rows <= BF16_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           layout: str = "in_out") -> torch.Tensor:
    """``x @ weight (+ bias)``; ``weight`` is stored [in, out] (our projections) or [out, in] (``layout="out_in"``:
    PyTorch's ``F.linear`` layout, the lm_head). Decoding's few-row fp32 products on a CPU (1 row per sequence, or a
    verify block, or mask tokens) run in the packed kernel on a packed copy of the weight: BLAS takes 2-5x
    longer than the bandwidth floor there (see the module docstring). Prefill and training use plain GEMMs."""
    columns = weight.shape[1] if layout == "in_out" else weight.shape[0]
    if takes_packed_path(x, weight, columns):
        blocks = block_packing(weight, layout) if x.numel() // x.shape[-1] <= BLOCKS_MAX_ROWS else None
        out = few_rows_matmul(x.float(), packed_weight(weight, layout) if blocks is None else blocks).to(x.dtype)
    else:
        out = x @ weight if layout == "in_out" else F.linear(x, weight)
    return out if bias is None else out + bias


# ---- build -----------------------------------------------------------------------------------------------------------
def _load_weights(isa: Isa, weights: str, offset: str) -> str:
    """C for ``width`` consecutive packed weights as fp32 lanes. A bf16 weight is the top half of an fp32 one: widen
    to 32 bits and shift left 16 (exact; plain AVX2 / AVX-512F, no BF16 instructions needed)."""
    if weights == "f32":
        return f"{isa.op}_loadu_ps(w + {offset})"
    if isa.width == 16:
        return f"_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + {offset}))), 16))"
    return f"_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + {offset}))), 16))"


def _fmas(isa: Isa, rows: int, tiles: int, k: str, weight: str, indent: str) -> list[str]:
    """C: every accumulator a[r][t][part] += x[r, k] * the weight registers ``{weight}{t}_{part}``."""
    lines = []
    for r in range(rows):
        lines.append(f"{indent}b = {isa.op}_set1_ps(x[{r} * K + {k}]);")
        lines += [f"{indent}a{r}_{t}_{h} = {isa.op}_fmadd_ps(b, {weight}{t}_{h}, a{r}_{t}_{h});"
                  for t in range(tiles) for h in range(TILE // isa.width)]
    return lines


def _stores(isa: Isa, rows: int, tiles: int) -> list[str]:
    """C: the accumulators to the output rows, and the pass function's end."""
    return [f"    {isa.op}_storeu_ps(out + {r} * N + {t * TILE + h * isa.width}, a{r}_{t}_{h});"
            for r in range(rows) for t in range(tiles) for h in range(TILE // isa.width)] + ["}"]


def _pass_function(isa: Isa, rows: int, tiles: int, weights: str = "f32") -> list[str]:
    """C for one pass of ``rows`` rows over ``tiles`` consecutive tiles: a[r][t][part] accumulate over k, a tile
    being ``TILE / width`` registers wide."""
    parts = TILE // isa.width
    V, op = isa.vector, isa.op
    acc = [f"a{r}_{t}_{h}" for r in range(rows) for t in range(tiles) for h in range(parts)]
    lines = [f"static void pass_{weights}_{rows}x{tiles}(const float *x, int64_t K, const {WEIGHT_C_TYPES[weights]} *w,"
             f" float *out, int64_t N) {{",
             f"    {V} {', '.join(a + f' = {op}_setzero_ps()' for a in acc)};",
             "    for (int64_t k = 0; k < K; k++) {",
             f"        {V} b;"]
    for t in range(tiles):
        loads = ", ".join(f"w{t}_{h} = {_load_weights(isa, weights, f'({t} * K + k) * {TILE} + {h * isa.width}')}"
                          for h in range(parts))
        lines.append(f"        {V} {loads};")
    return lines + _fmas(isa, rows, tiles, "k", "w", "        ") + ["    }"] + _stores(isa, rows, tiles)


def _pass_function_blocks(isa: Isa, rows: int, tiles: int, kind: str) -> list[str]:
    """C for one pass of ``rows`` rows over ``tiles`` tiles of a GGUF block packing (``pack_blocks``): per block, a
    tile's d (and m); per row of 16 bytes, the tile's q at one k (Q8_0) or two (Q4_1). Each weight is rebuilt as
    the dequantisation made it (``d * q``, then ``+ m``: separate roundings; but d is an fp16 value and q has 4 bits,
    so ``d * q`` is exact in fp32 and one FMA gives the same bits, 2 fewer instructions per 32 weights) and the
    accumulators take k in order: the fp32 packing's FMA chain on the same values."""
    parts, W = TILE // isa.width, isa.width
    V, op = isa.vector, isa.op
    Vi, iop = ("__m512i", "_mm512") if W == 16 else ("__m256i", "_mm256")
    q4 = kind == "q4"
    num_scales, k_per_row = (2, 2) if q4 else (1, 1)
    acc = [f"a{r}_{t}_{h}" for r in range(rows) for t in range(tiles) for h in range(parts)]
    half = "_mm256_loadu_si256((const __m256i *)" if W == 16 else "_mm_loadu_si128((const __m128i *)"

    def widened(t, offset):   # W fp16 scales at byte ``offset`` of tile t's block, as fp32 lanes (exact)
        return f"{op}_cvtph_ps({half}(p{t} + {offset})))"
    scales = ", ".join(f"d{t}_{h} = {widened(t, h * W * SCALE_BYTES)}"
                       + (f", m{t}_{h} = {widened(t, (TILE + h * W) * SCALE_BYTES)}" if q4 else "")
                       for t in range(tiles) for h in range(parts))
    load = "_mm_loadu_si128" if W == 16 else "_mm_loadl_epi64"
    widen = f"{iop}_cvtepu8_epi32" if q4 else f"{iop}_cvtepi8_epi32"
    lines = [f"static void pass_{kind}_{rows}x{tiles}(const float *x, int64_t K, const {WEIGHT_C_TYPES[kind]} *w, "
             "float *out, int64_t N) {",
             f"    {V} {', '.join(a + f' = {op}_setzero_ps()' for a in acc)};",
             f"    const {Vi} low = {iop}_set1_epi32(15);" if q4 else "",
             f"    const int64_t blocks = K / {BLOCK};",
             "    for (int64_t blk = 0; blk < blocks; blk++) {",
             "        const uint8_t " + ", ".join(f"*p{t} = (const uint8_t *)w + ({t} * blocks + blk) * "
                                               f"{BLOCK_BYTES[kind]}" for t in range(tiles)) + ";",
             f"        const {V} {scales};",
             f"        for (int64_t kk = 0; kk < {BLOCK // k_per_row}; kk++) {{",
             f"            const int64_t k = blk * {BLOCK} + {k_per_row} * kk;",
             f"            {V} b;"]
    rebuilt = ["e", "o"] if q4 else ["e"]
    for t in range(tiles):
        for h in range(parts):
            lines.append(f"            const {Vi} v{t}_{h} = {widen}({load}((const __m128i *)"
                         f"(p{t} + {num_scales * TILE * SCALE_BYTES} + kk * {TILE} + {h * W})));")
            if q4:
                nibbles = (("e", f"{iop}_and_si{W * 32}(v{t}_{h}, low)"), ("o", f"{iop}_srli_epi32(v{t}_{h}, 4)"))
                for name, nibble in nibbles:   # d * q is exact (11 x 4 significant bits): one FMA rounds as two did
                    lines.append(f"            const {V} {name}{t}_{h} = {op}_fmadd_ps(d{t}_{h}, "
                                 f"{op}_cvtepi32_ps({nibble}), m{t}_{h});")
            else:
                lines.append(f"            const {V} e{t}_{h} = {op}_mul_ps(d{t}_{h}, {op}_cvtepi32_ps(v{t}_{h}));")
    for offset, name in enumerate(rebuilt):
        lines += _fmas(isa, rows, tiles, f"k + {offset}", name, "            ")
    return lines + ["        }", "    }"] + _stores(isa, rows, tiles)


def source(isa: Isa = ISAS["avx2"]) -> str:
    """The C source: pass functions for every (rows, tiles) pair and a driver that splits tiles over threads, for
    fp32 weights (``few_rows_matmul_f32``), bf16 weights (``few_rows_matmul_bf16``) and GGUF blocks
    (``few_rows_matmul_q4``, ``few_rows_matmul_q8``)."""
    lines = ["#include <immintrin.h>", "#include <stdint.h>",
             f"/* out[M, N] = x[M, K] @ W, W packed [N/16, K, 16]; {isa.name} (kernels/cpu_matmul.py generates this "
             f"file). */"]
    for weights in WEIGHT_C_TYPES:
        lines += _driver(isa, weights)
    return "\n".join(lines) + "\n"


def _driver(isa: Isa, weights: str) -> list[str]:
    R = isa.max_rows
    blocks = weights in BLOCK_BYTES
    step_of = BLOCK_TILES_PER_PASS[isa.name] if blocks else isa.tiles_per_pass
    pass_function = (lambda rows, tiles: _pass_function_blocks(isa, rows, tiles, weights)) if blocks else (
        lambda rows, tiles: _pass_function(isa, rows, tiles, weights))
    tile_stride = f"K / {BLOCK} * {BLOCK_BYTES[weights]}" if blocks else f"K * {TILE}"   # in the weights' units
    lines = []
    for rows in range(1, R + 1):
        lines += pass_function(rows, 1)
        if step_of.get(rows, 1) > 1:
            lines += pass_function(rows, step_of[rows])
    table = ", ".join(f"pass_{weights}_{r}x1" for r in range(1, R + 1))
    wide = ", ".join(f"pass_{weights}_{r}x{step_of[r]}" if step_of.get(r, 1) > 1 else "0" for r in range(1, R + 1))
    step = ", ".join(str(step_of.get(r, 1)) for r in range(1, R + 1))
    w_type = WEIGHT_C_TYPES[weights]
    return lines + [
        f"typedef void (*pass_{weights}_fn)(const float *, int64_t, const {w_type} *, float *, int64_t);",
        f"static const pass_{weights}_fn NARROW_{weights}[{R + 1}] = {{0, {table}}};",
        f"static const pass_{weights}_fn WIDE_{weights}[{R + 1}] = {{0, {wide}}};",
        f"static const int64_t STEP_{weights}[{R + 1}] = {{0, {step}}};",
        f"void few_rows_matmul_{weights}(const float *x, int64_t M, int64_t K, const {w_type} *w, float *out, "
        "int64_t N, int threads) {",
        f"    int64_t tiles = N / {TILE};",
        "    #pragma omp parallel for num_threads(threads) schedule(static)",
        "    for (int64_t g = 0; g < tiles; g++) {",
        f"        for (int64_t m0 = 0; m0 < M; m0 += {R}) {{",
        f"            int64_t r = M - m0 < {R} ? M - m0 : {R}, s = STEP_{weights}[r];",
        "            /* several tiles per pass only from the start of an aligned group that lies wholly inside */",
        "            if (s > 1 && g % s != 0) continue;",
        "            if (s > 1 && g + s <= tiles) {",
        f"                WIDE_{weights}[r](x + m0 * K, K, w + g * ({tile_stride}), out + m0 * N + g * {TILE}, N);",
        "            } else {",
        "                for (int64_t t = g; t < (s > 1 ? tiles : g + 1); t++)",
        f"                    NARROW_{weights}[r](x + m0 * K, K, w + t * ({tile_stride}), out + m0 * N + t * {TILE}, "
        "N);",
        "            }",
        "        }",
        "    }",
        "}",
    ]


_WHY_NOT: str | None = None
ISA: Isa | None = None    # the variant in use, once ``available()`` has built it


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def runnable_isas() -> list[str]:
    """The variants this CPU runs, widest first (none off x86-64)."""
    if not _x86_64():
        return []
    flags = cpu_flags()
    return [name for name in ("avx512", "avx2") if ISAS[name].cpu_flags <= flags]


def chosen_isa() -> Isa:
    """The widest variant this CPU runs; $FLEXDRAFT_CPU_MATMUL_ISA (avx2, avx512) picks one instead."""
    asked = os.environ.get("FLEXDRAFT_CPU_MATMUL_ISA")
    if asked is not None and asked not in ISAS:
        raise RuntimeError(f"FLEXDRAFT_CPU_MATMUL_ISA must be one of {', '.join(ISAS)}, got {asked!r}")
    if not _x86_64():
        raise RuntimeError(f"not an x86-64 CPU ({platform.machine()})")
    runnable = runnable_isas()
    if asked is not None:
        if asked not in runnable:
            raise RuntimeError(f"FLEXDRAFT_CPU_MATMUL_ISA={asked}, but this CPU lacks "
                               f"{', '.join(sorted(ISAS[asked].cpu_flags - cpu_flags()))}")
        return ISAS[asked]
    if not runnable:
        raise RuntimeError("this CPU lacks AVX2/FMA")
    return ISAS[runnable[0]]


def _build(isa: Isa) -> tuple[ctypes.CDLL, dict]:
    """The compiled variant and its C functions, one per weight format."""
    lib = compile_library(f"cpu_matmul-{isa.name}", source(isa), [*CFLAGS, *isa.cflags])
    runners = {}
    for weights in WEIGHT_C_TYPES:
        fn = runners[weights] = getattr(lib, f"few_rows_matmul_{weights}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int]
        fn.restype = None
    return lib, runners


_LIBS: dict[str, ctypes.CDLL] = {}
_RUNNERS: dict[str, dict] = {}   # per variant: weight format -> its C function


def library(isa: Isa) -> ctypes.CDLL:
    """The compiled variant for ``isa`` (built on first use, then cached on disk and in the process)."""
    if isa.name not in _LIBS:
        _LIBS[isa.name], _RUNNERS[isa.name] = _build(isa)
    return _LIBS[isa.name]


def _library() -> ctypes.CDLL:
    if not available():
        raise RuntimeError(f"the packed CPU matmul is unavailable: {_WHY_NOT}")
    return library(ISA)


def _runners(isa: Isa | None) -> dict:
    """The C functions of ``isa``'s variant, or of the one chosen for this CPU."""
    if isa is None:
        if ISA is None:
            _library()   # builds the chosen variant, or raises saying why it cannot
        isa = ISA
    if isa.name not in _RUNNERS:
        library(isa)
    return _RUNNERS[isa.name]


def available() -> bool:
    """Whether the packed kernel runs here (built on the first call). $FLEXDRAFT_CPU_MATMUL=0 turns it off."""
    global _WHY_NOT, ISA
    if ISA is None and _WHY_NOT is None:
        if os.environ.get("FLEXDRAFT_CPU_MATMUL", "1") == "0":
            _WHY_NOT = "turned off by FLEXDRAFT_CPU_MATMUL=0"
        else:
            try:
                isa = chosen_isa()
                library(isa)
                ISA = isa
            except (RuntimeError, OSError) as exc:
                _WHY_NOT = str(exc)
    return ISA is not None


def why_unavailable() -> str | None:
    """None when ``available()``, else the reason."""
    return None if available() else _WHY_NOT
