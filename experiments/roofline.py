"""The roofline harness: T(batch, query tokens per sequence, context) of every pass a decode step runs, through our
runtime with the active kernels backend, each point set against the device's floors.

Ops (``tokens`` is query tokens per sequence, the clean tokens of a step: the verify length + 1):
  target           the target forward: ``tokens`` clean tokens through all layers and lm_head on them
  draft            the drafter's tuned-layer pass: one block of B_s masks per sequence (the sequential draft pass)
  head             the calibrated draft head over B_s - 1 slots per sequence
  prefill          ``tokens`` prompt tokens through all layers, lm_head on the last
  step_ar          the engine's ar step (flex's fallback): one token through the target, chosen
  step_sequential  the engine's sequential step: verify pass, greedy verification; then the draft pass and draft
                   head that open the next step (skipped there only where every row copies its drafts)
  step_parallel    the engine's parallel step: ``tokens`` clean tokens beside ``tokens`` mask groups of B_s masks
                   in the tuned layers, greedy verification, draft head
  loop             the decode loop's bookkeeping per step (outputs, stops, verify lengths, histogram)
  lookup           a speculative step's prompt-lookup proposal (every speculative step looks for a copy)
The step ops call the engine's own step functions, so a prediction built on them misses only what ``loop`` and
``lookup`` time.

Floors: bytes moved over the measured bandwidth (a large copy), FLOPs over the measured peak (a large GEMM).
``work`` is the bytes and FLOPs model: weights read once per pass, K/V read once per sequence, useful FLOPs only.
Repetitions are interleaved over all points (one pass over every point per repetition); a point's time is their lower
quartile (``point_seconds``).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from flexdraft.batch import Batch
from flexdraft.rng import Streams
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import Drafts, SpecConfig, draft_pass, mask_block, next_drafts, verify_len

OPS = ("target", "draft", "head", "prefill", "step_ar", "step_sequential", "step_parallel", "loop", "lookup")
STEP_OPS = {"ar": "step_ar", "sequential": "step_sequential", "parallel": "step_parallel"}


@dataclass
class Grid:
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    tokens: tuple[int, ...] = (1, 2, 4, 8, 16)      # capped at the drafter's block size, which is always included
    contexts: tuple[int, ...] = (256,)
    prompt_len: int = 128
    repeats: int = 3
    min_sample_s: float = 0.03                      # calls per sample are repeated up to this long
    # Points whose token-equivalents (batch x tokens, masks weighted by the share of layers they run) exceed this are
    # left out, except the two smallest along the axis the cost table extrapolates (tokens; batch for prefill).
    max_call_tokens: int | None = 256
    # Prefill is measured up to here instead (batch 32 x 128 tokens): an end-to-end prediction at a large batch is
    # about half prefill, and extrapolating it from batches 1-2 assumes a cost per token that a CPU need not keep.
    max_prefill_tokens: int | None = 4096


QUICK = Grid(batches=(1, 2, 4), tokens=(1, 2, 4), contexts=(32,), prompt_len=16, repeats=3, min_sample_s=0.005,
             max_call_tokens=None, max_prefill_tokens=None)


# ---- the bytes and FLOPs model -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    layers: int
    tuned: int
    block: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    rank: int
    itemsize: int
    head_itemsize: int | None = None   # the draft head's weights where they differ (bf16 copies on a CPU)
    draft_vocab: int | None = None     # the words the draft head scores, where fewer than the target's
    # Bytes a weight streams where a product of up to ``block_rows`` rows reads the GGUF blocks the weights came from
    # (kernels/cpu_matmul.py: Q4_1 layers 0.625, a Q8_0 lm_head 1.0625); None: ``itemsize``.
    block_itemsize: float | None = None
    block_lm_itemsize: float | None = None
    block_rows: int = 0

    @classmethod
    def of(cls, model, drafter) -> "Shape":
        c = model.config
        head_dtype = drafter.head_dtype(model)
        blocks = block_itemsizes(model)
        return cls(c.num_layers, c.num_layers - drafter.split_layer, drafter.block_size, c.hidden_size,
                   c.intermediate_size, c.vocab_size, c.num_heads, c.num_kv_heads, c.head_dim,
                   drafter.config.calibration_rank, model.dtype.itemsize,
                   None if head_dtype == model.dtype else head_dtype.itemsize, drafter.config.draft_vocab_size,
                   *blocks)

    def weights_bytes(self, layers: int, rows: int, lm: bool = False) -> float:
        """Bytes of ``layers`` layers' weights (and the lm_head) that a product of ``rows`` rows streams."""
        blocks = self.block_itemsize is not None and rows <= self.block_rows
        layer_size = self.block_itemsize if blocks else self.itemsize
        lm_size = (self.block_lm_itemsize or self.itemsize) if blocks else self.itemsize
        return layer_size * layers * self.layer_params + (lm_size * self.vocab * self.hidden if lm else 0.0)

    @property
    def attn_params(self) -> int:
        return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden

    @property
    def layer_params(self) -> int:
        return self.attn_params + 3 * self.hidden * self.intermediate

    @property
    def head_vocab(self) -> int:
        return self.draft_vocab or self.vocab

    @property
    def head_params(self) -> int:
        return self.head_vocab * self.hidden + 2 * self.hidden * self.rank + self.rank * self.head_vocab

    def attention_flops(self, queries: float, keys: float) -> float:
        return 4.0 * self.heads * self.head_dim * queries * keys     # QK^T and PV, one layer

    def kv_bytes(self, layers: int, positions: float) -> float:
        return layers * 2.0 * self.kv_heads * self.head_dim * self.itemsize * positions


def block_itemsizes(model) -> tuple[float | None, float | None, int]:
    """(layer, lm_head, rows) for ``Shape``: what the packed CPU kernel streams per weight where the model's weights
    are GGUF blocks; (None, None, 0) elsewhere (a GPU, bf16, other checkpoints, the kernel off)."""
    from kernels import cpu_matmul

    if not (model.device.type == "cpu" and model.dtype == torch.float32 and cpu_matmul.available()):
        return None, None, 0
    sizes = []
    for weight, layout in ((model.layers[0].w_gate_up, "in_out"), (model.lm_head, "out_in")):
        packed = cpu_matmul.block_packing(weight, layout)
        sizes.append(None if packed is None else packed.numel() * packed.element_size() / weight.numel())
    return sizes[0], sizes[1], cpu_matmul.BLOCKS_MAX_ROWS if sizes[0] is not None else 0


def work(op: str, s: Shape, batch: int, tokens: int, context: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one call of ``op``."""
    lm = s.vocab * s.hidden
    if op.startswith("step_") or op in ("loop", "lookup"):
        parts = {"step_ar": [("target", 1)], "loop": [], "lookup": [],
                 "step_sequential": [("target", tokens), ("draft", s.block), ("head", s.block - 1), ("verify", tokens)],
                 "step_parallel": [("parallel", tokens), ("head", s.block - 1), ("verify", tokens)]}[op]
        totals = [work(part, s, batch, q, context) for part, q in parts]
        return float(sum(f for f, _ in totals)), float(sum(b for _, b in totals))
    if op in ("target", "parallel"):
        t = batch * tokens
        flops = 2.0 * t * (s.layers * s.layer_params + lm) + s.layers * s.attention_flops(t, context + (tokens + 1) / 2)
        moved = s.weights_bytes(s.layers, t, lm=True) + s.kv_bytes(s.layers, batch * (context + tokens))
        if op == "parallel":
            m = t * s.block
            flops += 2.0 * m * s.tuned * s.layer_params + s.tuned * s.attention_flops(m, context + tokens / 2 + s.block)
            moved += s.itemsize * s.tuned * s.attn_params   # the drafter's projectors; the MLPs are read anyway
        return flops, moved
    if op == "draft":
        m = batch * s.block
        return (2.0 * m * s.tuned * s.layer_params + s.tuned * s.attention_flops(m, context + s.block),
                s.weights_bytes(s.tuned, m) + s.kv_bytes(s.tuned, batch * context))
    if op == "head":
        rows = batch * (s.block - 1)
        return 2.0 * rows * s.head_params, (s.head_itemsize or s.itemsize) * (s.head_params + rows * s.head_vocab)
    if op == "verify":
        return float(batch * tokens * s.vocab), float(batch * tokens * s.vocab * s.itemsize)
    if op == "prefill":
        t = batch * tokens
        return (2.0 * t * s.layers * s.layer_params + 2.0 * batch * lm
                + s.layers * s.attention_flops(t, (tokens + 1) / 2),
                s.weights_bytes(s.layers, t, lm=True) + s.kv_bytes(s.layers, t))
    raise ValueError(f"unknown op {op!r}")


# ---- timing ----------------------------------------------------------------------------------------------------
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(calls: dict, repeats: int, min_sample_s: float, device, clock=time.perf_counter) -> dict:
    """Seconds per call, ``repeats`` samples per key, one pass over every key per repetition (noise spreads evenly).

    ``clock``: wall time by default; ``time.thread_time`` (one thread, CPU) leaves other processes' load out."""
    inner = {}
    for key, fn in calls.items():           # warm up, and pick how many calls make one sample
        fn()
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        inner[key] = max(1, math.ceil(min_sample_s / max(clock() - start, 1e-7)))
    samples = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            start = clock()
            for _ in range(inner[key]):
                fn()
            synchronize(device)
            samples[key].append((clock() - start) / inner[key])
    return samples


def measure_ceilings(device="cpu", dtype=torch.float32, quick: bool = False, repeats: int = 5) -> dict:
    """Bandwidth from a large copy ((read + write) bytes / s) and peak FLOP/s from a large square GEMM in ``dtype``:
    the faster of BLAS and the runtime's own product (on a CPU the packed kernel, which beats BLAS on some hosts)."""
    from kernels.cpu_matmul import linear

    cuda = torch.device(device).type == "cuda"
    numel = (4 << 20) if quick else ((1 << 30) if cuda else (64 << 20))
    n = 256 if quick else (8192 if cuda else 2048)
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    calls = {"copy": lambda: dst.copy_(src), "gemm": lambda: a @ b}
    if not cuda:
        calls["gemm_runtime"] = lambda: linear(a, b)
    samples = time_interleaved(calls, repeats, 0.0 if not quick else 0.002, device)
    copy_s = statistics.median(samples["copy"])
    gemm = {key: 2.0 * n ** 3 / statistics.median(samples[key]) for key in calls if key.startswith("gemm")}
    source = max(gemm, key=gemm.get)
    return {"bandwidth": 2 * src.numel() * src.element_size() / copy_s, "peak_flops": gemm[source],
            "gemm_source": {"gemm": "BLAS", "gemm_runtime": "the runtime's product"}[source],
            "gemm_flops": {key: round(v) for key, v in gemm.items()},
            "copy_bytes": 2 * src.numel() * src.element_size(), "gemm_n": n, "dtype": str(dtype).removeprefix("torch."),
            "samples": {k: [round(x, 7) for x in v] for k, v in samples.items()}}


# ---- the ops, through our runtime ------------------------------------------------------------------------------
def op_call(op: str, model, drafter, cache, batch: int, tokens: int, context: int):
    """A no-argument call that runs ``op`` once on prepared inputs (the cache's contents do not matter for time)."""
    from flexdraft.speculative import STEPS, Stats

    device, block, vocab = model.device, drafter.block_size, model.config.vocab_size
    g = torch.Generator().manual_seed(batch * 1000 + tokens)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g).to(device)
    positions = (context + torch.arange(tokens))[None, :].expand(batch, -1).to(device)
    lengths = torch.full((batch,), context, dtype=torch.int64, device=device)
    # Steps of chains, as the harness models them (no trees: SpecConfig.tree_nodes).
    greedy, spec, streams = SamplingParams(), SpecConfig(tree_nodes=0), Streams(torch.arange(batch))
    drafts = Drafts(torch.randint(0, vocab, (batch, block - 1), generator=g).to(device),
                    torch.rand(batch, block - 1, generator=g).to(device), None)
    num_drafts = torch.full((batch,), tokens - 1, dtype=torch.int64, device=device)

    if op == "target":
        def call():
            hidden, _ = model(ids, positions, cache)
            return model.logits(hidden)
    elif op == "draft":
        masks = mask_block(lengths - 1, 1, block)
        empty = torch.empty(batch, 0, dtype=torch.int64, device=device)

        def call():
            return model(empty, empty, cache, masks, drafter)[1]
    elif op == "head":
        hidden = torch.randn(batch, block, model.config.hidden_size, generator=g).to(device, model.dtype)

        def call():
            return next_drafts(model, drafter, hidden, ids[:, 0], greedy, spec, streams)
    elif op == "prefill":
        prompt_positions = torch.arange(tokens, device=device)[None, :].expand(batch, -1)

        def call():
            hidden, _ = model(ids, prompt_positions, cache)
            return model.logits(hidden[:, -1])
    elif op in STEP_OPS.values():
        step = STEPS[op.removeprefix("step_")]

        def call():
            stats = Stats(accept_histogram=[0] * (block + 1))
            out = step(model, drafter, cache, ids[:, 0], drafts, num_drafts, greedy, spec, streams, stats)
            if op == "step_sequential":
                return draft_pass(model, drafter, cache, out[2], greedy, spec, streams, stats)
            return out
    elif op == "loop":
        out = torch.randint(0, vocab, (batch, tokens), generator=g).to(device)
        gained = torch.randint(1, tokens + 1, (batch,), generator=g).to(device)
        record = Batch(batch, 4 * block, [[-1]] * batch, device)

        def call():
            record.generated.zero_()
            record.append(out, gained)
            room = record.max_new_tokens - record.generated[record.rows]
            torch.minimum(verify_len(drafts.confidence, spec), (room - 1).clamp(min=1))
            return torch.bincount(gained, minlength=block + 1).tolist()
    elif op == "lookup":
        from flexdraft.lookup import PromptLookup

        proposals = PromptLookup(torch.randint(0, vocab, (batch, max(context, 8)), generator=g).tolist(), device)
        record = Batch(batch, 4 * block, [[-1]] * batch, device)

        def call():
            return proposals.propose(record, block - 1)
    else:
        raise ValueError(f"unknown op {op!r}")

    def run():
        cache.lengths = lengths.clone()
        with torch.no_grad():
            return call()
    return run


def grid_points(grid: Grid, block: int, mask_share: float = 1.0, tree_tokens: int = 0) -> list[tuple[str, int, int, int]]:
    """(op, batch, tokens, context) of every point the harness measures; ``mask_share`` = tuned / all layers. The
    target's pass is also measured up to ``tree_tokens`` query tokens (a tree step's bonus and nodes)."""
    tokens = sorted({t for t in grid.tokens if t <= block} | {block})
    target_tokens = sorted(set(tokens) | {t for t in grid.tokens if t <= tree_tokens} | ({tree_tokens} - {0}))
    budget = grid.max_call_tokens or float("inf")

    def within(sizes, cost, limit=budget):
        return [x for i, x in enumerate(sizes) if i < 2 or cost(x) <= limit]

    points = []
    for b in grid.batches:
        for ctx in grid.contexts:
            points += [("target", b, q, ctx) for q in within(target_tokens, lambda q: b * q)]
            points += [("draft", b, block, ctx), ("step_ar", b, 1, ctx)]
            points += [("step_sequential", b, q, ctx)
                       for q in within(tokens[1:], lambda q: b * (q + block * mask_share))]
            points += [("step_parallel", b, q, ctx)
                       for q in within(tokens[1:], lambda q: b * q * (1 + block * mask_share))]
        points += [("head", b, block - 1, 0), ("lookup", b, block, 0)] + [("loop", b, q, 0) for q in tokens]
    prefill_budget = grid.max_prefill_tokens or float("inf")
    points += [("prefill", b, grid.prompt_len, 0)
               for b in within(sorted(grid.batches), lambda b: b * grid.prompt_len, prefill_budget)]
    return points


def cost_calls(model, drafter, grid: Grid) -> dict:
    """{(op, batch, tokens, context): call} for every grid point (one cache per batch size and context, shared)."""
    shape = Shape.of(model, drafter)
    # Tree steps and long copies (at small batch) pass the bonus and up to ``tree_nodes`` nodes, or a copy of up to
    # ``longest_copy`` drafts, through the target.
    spec = SpecConfig()
    points = grid_points(grid, drafter.block_size, shape.tuned / shape.layers,
                         max(spec.tree_nodes, spec.lookup_len, spec.longest_copy) + 1)
    lengths = {}
    for _, b, q, ctx in points:
        lengths[(b, ctx)] = max(lengths.get((b, ctx), 0), ctx + q + 1)
    caches = {key: model.new_cache(key[0], length) for key, length in lengths.items()}
    return {p: op_call(p[0], model, drafter, caches[(p[1], p[3])], *p[1:]) for p in points}


def point_seconds(samples: list[float]) -> float:
    """A point's time from its repetitions: the lower quartile (the second fastest of 5). Load from other processes
    only ever adds time, and on a shared 2-core host it hit up to 3 of 5 repetitions of a point (a batch-1 target
    pass of 11 tokens: 34, 34, 49, 55, 66 ms; its median made a tree step look 6 ms dearer than the engine ran it and
    flex chose the slower mode); the very fastest would follow the one lucky repetition."""
    return sorted(samples)[len(samples) // 4]


def cost_rows(samples: dict, model, drafter) -> list[dict]:
    """The grid points among ``samples`` as rows: seconds (``point_seconds``), samples, FLOPs and bytes."""
    shape = Shape.of(model, drafter)
    rows = []
    for key, times in samples.items():
        if key[0] not in OPS:
            continue
        op, b, q, ctx = key
        flops, moved = work(op, shape, b, q, ctx)
        rows.append({"op": op, "batch": b, "tokens": q, "context": ctx, "seconds": point_seconds(times),
                     "samples": [round(t, 7) for t in times], "flops": flops, "bytes": moved})
    return rows


def measure_costs(model, drafter, grid: Grid = Grid(), log=lambda message: None, clock=time.perf_counter) -> list[dict]:
    """Every grid point's seconds, samples, FLOPs and bytes, measured with interleaved repetitions."""
    calls = cost_calls(model, drafter, grid)
    log(f"timing {len(calls)} points x {grid.repeats} interleaved repetitions ...")
    start = time.perf_counter()
    samples = time_interleaved(calls, grid.repeats, grid.min_sample_s, model.device, clock)
    log(f"  done in {time.perf_counter() - start:.0f} s")
    return cost_rows(samples, model, drafter)


def floors(rows: list[dict], ceilings: dict) -> list[dict]:
    """Each point with its floor (max of bytes / bandwidth and FLOPs / peak), attained FLOP/s and intensity."""
    out = []
    for r in rows:
        floor = max(r["bytes"] / ceilings["bandwidth"], r["flops"] / ceilings["peak_flops"])
        out.append({**r, "floor_s": floor, "of_floor": floor / r["seconds"], "flop_s": r["flops"] / r["seconds"],
                    "intensity": r["flops"] / r["bytes"] if r["bytes"] else 0.0})
    return out


# ---- the cost table: interpolation over the measured grid -------------------------------------------------------
def _interp(x: float, xs: list, ys: list) -> float:
    """Piecewise linear in x. Past the ends, linear from the two nearest points with the slope floored at 0:
    a cost never falls as the work grows, whatever the noise in the last two points."""
    if len(xs) == 1:
        return ys[0]
    i = max(1, min(len(xs) - 1, next((k for k, v in enumerate(xs) if v >= x), len(xs) - 1)))
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    slope = (y1 - y0) / (x1 - x0)
    if x > x1:
        return y1 + max(slope, 0.0) * (x - x1)
    if x < x0:
        return y0 - max(slope, 0.0) * (x0 - x)
    return y0 + slope * (x - x0)


@dataclass
class CostTable:
    """T(op, batch, tokens, context) from measured points: piecewise linear in tokens and in batch (extrapolated
    linearly past the measured points) and in context (clamped to the measured range)."""
    points: dict = field(default_factory=dict)      # op -> {(batch, tokens, context): seconds}

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "CostTable":
        table = cls()
        for r in rows:
            table.points.setdefault(r["op"], {})[(r["batch"], r["tokens"], r["context"])] = r["seconds"]
        return table

    def time(self, op: str, batch: float, tokens: float = 1, context: float = 0) -> float:
        grid = self.points[op]
        batches = sorted({b for b, _, _ in grid})
        contexts = sorted({c for _, _, c in grid})
        context = min(max(context, contexts[0]), contexts[-1])

        def at(b, c):
            qs = sorted(q for bb, q, cc in grid if bb == b and cc == c)
            return _interp(tokens, qs, [grid[(b, q, c)] for q in qs])

        def over_batch(c):
            return _interp(batch, batches, [at(b, c) for b in batches])

        return max(_interp(context, contexts, [over_batch(c) for c in contexts]), 0.0)


def shape_dict(model, drafter) -> dict:
    return asdict(Shape.of(model, drafter))
