"""Few-row fp32 products on an x86 CPU: ``x [M, K] @ W`` for M = 1..~64 rows against a weight packed once.

Decoding on a CPU multiplies a handful of rows (the batch, or a verify block of bonus + drafts, or the mask tokens)
by weights streamed from DRAM. Memory bandwidth is the floor there: up to ~8 rows the product should cost what one
row costs. BLAS does not get there: measured on an AVX2 EPYC, 1 thread, twelve 576 x 3072 weights (85 MB), MKL's
``x @ W`` takes 7 ms for 1 row but 34 ms for 4 and 40 ms for 16; the old small-N workaround ``W^T @ x^T`` 14 / 31 ms.
It repacks the weight on every call, which costs more than the product. This kernel packs the weight once, tile-major
``[N/16, K, 16]``, so each 16-column tile streams contiguously through cache once while up to 6 rows (12 AVX2
accumulators) consume it: 8.7 ms for 4 rows, 18 ms for 16 (~58 GFLOP/s, MKL's large-GEMM peak on that core).

Every output element is a plain sum over k = 0..K-1 in order, whatever M is and whichever rows share a call, so a
row's result does not depend on its batch: a verify pass over [bonus, drafts] gives the bonus exactly the logits a
one-row autoregressive step gives it.

The C source is generated below (one function per row count, accumulators as named locals: GCC spills an array of
them), compiled with the system C compiler on first use into the cache and loaded with ctypes. Where that cannot
work (no compiler, no AVX2/FMA, not x86-64) ``available()`` is False, says why, and callers use torch.

Module / reference / test / benchmark: ``few_rows_matmul`` here, ``few_rows_matmul_reference`` beside it,
tests/test_kernel_cpu_matmul.py, tests/bench_kernels.py.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

TILE = 16        # output columns per tile: two 8-float AVX2 registers
MAX_ROWS = 6     # rows per pass over a tile: 6 x 2 accumulators + 2 weight registers + 1 broadcast of 16 registers
# Fewer rows than that leave FMA latency exposed, so they take several tiles per pass (same per-element sums).
TILES_PER_PASS = {1: 3, 2: 2}
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


def few_rows_matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ weight [K, N]``."""
    return x @ weight


def pack(weight: torch.Tensor, layout: str = "in_out") -> torch.Tensor:
    """``[N/16, K, 16]`` contiguous fp32 from a weight stored [K, N] (``in_out``) or [N, K] (``out_in``, PyTorch's
    ``F.linear`` layout, e.g. an lm_head)."""
    w = weight.detach()
    if layout == "out_in":
        w = w.t()
    elif layout != "in_out":
        raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}")
    K, N = w.shape
    if N % TILE:
        raise ValueError(f"the packed kernel needs a multiple of {TILE} output columns, got {N}")
    return w.float().reshape(K, N // TILE, TILE).permute(1, 0, 2).contiguous()


def few_rows_matmul(x: torch.Tensor, packed: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """``x [..., K] @ W`` for W packed by ``pack``: fp32 CPU tensors; returns [..., N]."""
    tiles, K, _ = packed.shape
    if x.shape[-1] != K or x.dtype != torch.float32 or packed.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"few_rows_matmul takes fp32 CPU tensors with K = {K}; got x {tuple(x.shape)} {x.dtype} "
                         f"on {x.device}")
    rows = x.reshape(-1, K).contiguous()
    out = torch.empty(rows.shape[0], tiles * TILE, dtype=torch.float32)
    _library().few_rows_matmul(rows.data_ptr(), rows.shape[0], K, packed.data_ptr(), out.data_ptr(),
                               tiles * TILE, threads or torch.get_num_threads())
    return out.view(*x.shape[:-1], tiles * TILE)


# ---- the dispatcher: products of the model and the draft head --------------------------------------------------
PACKED_MAX_ROWS = 128  # fp32 inference products of up to this many rows take the packed kernel (measured: faster
                       # than MKL at every count from 1 to 128 rows, at 1 and 2 threads)


def packed_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The weight packed for ``few_rows_matmul``, made once and remade when the weight changes in place."""
    key = (weight._version, weight.data_ptr(), layout)
    cached = getattr(weight, "_packed", None)
    if cached is None or cached[0] != key:
        cached = (key, pack(weight, layout))
        weight._packed = cached
    return cached[1]


def takes_packed_path(x: torch.Tensor, weight: torch.Tensor, columns: int) -> bool:
    """Whether ``x @ weight`` may run in the packed CPU kernel: an fp32 product of few rows, not under autocast, and
    nothing for autograd to track (the kernel has no backward)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() // x.shape[-1] <= PACKED_MAX_ROWS and columns % TILE == 0
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           layout: str = "in_out") -> torch.Tensor:
    """``x @ weight (+ bias)``; ``weight`` is stored [in, out] (our projections) or [out, in] (``layout="out_in"``:
    PyTorch's ``F.linear`` layout, the lm_head). Decoding's few-row fp32 products on a CPU (1 row per sequence, or a
    verify block, or mask tokens) run in the packed kernel on a packed copy of the weight: BLAS takes 2-5x
    longer than the bandwidth floor there (see the module docstring). Prefill and training use plain GEMMs."""
    columns = weight.shape[1] if layout == "in_out" else weight.shape[0]
    if takes_packed_path(x, weight, columns):
        out = few_rows_matmul(x, packed_weight(weight, layout))
    else:
        out = x @ weight if layout == "in_out" else F.linear(x, weight)
    return out if bias is None else out + bias


# ---- build -----------------------------------------------------------------------------------------------------------
def _pass_function(rows: int, tiles: int) -> list[str]:
    """C for one pass of ``rows`` rows over ``tiles`` consecutive tiles: a[r][t][half] accumulate over k."""
    acc = [f"a{r}_{t}_{h}" for r in range(rows) for t in range(tiles) for h in range(2)]
    lines = [f"static void pass_{rows}x{tiles}(const float *x, int64_t K, const float *w, float *out, int64_t N) {{",
             f"    __m256 {', '.join(a + ' = _mm256_setzero_ps()' for a in acc)};",
             "    for (int64_t k = 0; k < K; k++) {",
             "        __m256 b;"]
    for t in range(tiles):
        lines.append(f"        __m256 w{t}_0 = _mm256_loadu_ps(w + ({t} * K + k) * 16), "
                     f"w{t}_1 = _mm256_loadu_ps(w + ({t} * K + k) * 16 + 8);")
    for r in range(rows):
        lines.append(f"        b = _mm256_broadcast_ss(x + {r} * K + k);")
        for t in range(tiles):
            for h in range(2):
                lines.append(f"        a{r}_{t}_{h} = _mm256_fmadd_ps(b, w{t}_{h}, a{r}_{t}_{h});")
    lines.append("    }")
    for r in range(rows):
        for t in range(tiles):
            for h in range(2):
                lines.append(f"    _mm256_storeu_ps(out + {r} * N + {t * TILE + 8 * h}, a{r}_{t}_{h});")
    lines.append("}")
    return lines


def source() -> str:
    """The C source: pass functions for every (rows, tiles) pair and the driver that splits tiles over threads."""
    lines = ["#include <immintrin.h>", "#include <stdint.h>",
             "/* out[M, N] = x[M, K] @ W, W packed [N/16, K, 16] (kernels/cpu_matmul.py generates this file). */"]
    for rows in range(1, MAX_ROWS + 1):
        lines += _pass_function(rows, 1)
        if TILES_PER_PASS.get(rows, 1) > 1:
            lines += _pass_function(rows, TILES_PER_PASS[rows])
    table = ", ".join(f"pass_{r}x1" for r in range(1, MAX_ROWS + 1))
    wide = ", ".join(f"pass_{r}x{TILES_PER_PASS[r]}" if r in TILES_PER_PASS else "0" for r in range(1, MAX_ROWS + 1))
    step = ", ".join(str(TILES_PER_PASS.get(r, 1)) for r in range(1, MAX_ROWS + 1))
    lines += [
        "typedef void (*pass_fn)(const float *, int64_t, const float *, float *, int64_t);",
        f"static const pass_fn NARROW[{MAX_ROWS + 1}] = {{0, {table}}};",
        f"static const pass_fn WIDE[{MAX_ROWS + 1}] = {{0, {wide}}};",
        f"static const int64_t STEP[{MAX_ROWS + 1}] = {{0, {step}}};",
        "void few_rows_matmul(const float *x, int64_t M, int64_t K, const float *w, float *out, int64_t N,",
        "                     int threads) {",
        f"    int64_t tiles = N / {TILE};",
        "    #pragma omp parallel for num_threads(threads) schedule(static)",
        "    for (int64_t g = 0; g < tiles; g++) {",
        f"        for (int64_t m0 = 0; m0 < M; m0 += {MAX_ROWS}) {{",
        f"            int64_t r = M - m0 < {MAX_ROWS} ? M - m0 : {MAX_ROWS}, s = STEP[r];",
        "            /* several tiles per pass only from the start of an aligned group that lies wholly inside */",
        "            if (s > 1 && g % s != 0) continue;",
        "            if (s > 1 && g + s <= tiles) {",
        f"                WIDE[r](x + m0 * K, K, w + g * K * {TILE}, out + m0 * N + g * {TILE}, N);",
        "            } else {",
        "                for (int64_t t = g; t < (s > 1 ? tiles : g + 1); t++)",
        f"                    NARROW[r](x + m0 * K, K, w + t * K * {TILE}, out + m0 * N + t * {TILE}, N);",
        "            }",
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


_LIB: ctypes.CDLL | None = None
_WHY_NOT: str | None = None


def _cache_dir() -> Path:
    env = os.environ.get("FLEXDRAFT_CACHE")
    if env:
        return Path(env).expanduser() / "kernels"
    import platformdirs
    return Path(platformdirs.user_cache_dir("flexdraft")) / "kernels"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"not an x86-64 CPU ({platform.machine()})")
    if not {"avx2", "fma"} <= _cpu_flags():
        raise RuntimeError("this CPU lacks AVX2/FMA")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    text = source()
    digest = hashlib.sha256((text + " ".join(CFLAGS) + compiler).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_matmul-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            c_file, so_file = Path(tmp) / "cpu_matmul.c", Path(tmp) / "cpu_matmul.so"
            c_file.write_text(text)
            done = subprocess.run([compiler, *CFLAGS, str(c_file), "-o", str(so_file)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
            os.replace(so_file, target)   # atomic: a concurrent build never loads half a file
    lib = ctypes.CDLL(str(target))
    lib.few_rows_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.few_rows_matmul.restype = None
    return lib


def _library() -> ctypes.CDLL:
    if not available():
        raise RuntimeError(f"the packed CPU matmul is unavailable: {_WHY_NOT}")
    return _LIB


def available() -> bool:
    """Whether the packed kernel runs here (built on the first call). $FLEXDRAFT_CPU_MATMUL=0 turns it off."""
    global _LIB, _WHY_NOT
    if _LIB is None and _WHY_NOT is None:
        if os.environ.get("FLEXDRAFT_CPU_MATMUL", "1") == "0":
            _WHY_NOT = "turned off by FLEXDRAFT_CPU_MATMUL=0"
        else:
            try:
                _LIB = _build()
            except (RuntimeError, OSError) as exc:
                _WHY_NOT = str(exc)
    return _LIB is not None


def why_unavailable() -> str | None:
    """None when ``available()``, else the reason."""
    return None if available() else _WHY_NOT
