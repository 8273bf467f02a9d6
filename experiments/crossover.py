"""From measured step costs and the drafter's acceptance profile to Flex Decoding's choices on this device.

- ``measure_acceptance`` runs the engine one prompt at a time on held-out prompts verifying every draft (threshold 0)
  and keeps, per sequence and step, the drafts' confidences and how many were accepted: as verified at batch 1, where
  prompt-lookup copies run long (the profile's ``long``), and cut to the drafter's block as every larger batch
  verifies them (``acceptance_from_stats`` takes a stats JSON's histogram instead: no confidences, so no threshold
  can be tuned from it). A second run verifies trees of drafts as sequential steps do at small batch
  (``SpecConfig.tree_nodes``): per step, the nodes verified and the drafts accepted (the profile's ``tree``).
- ``predict_decode`` combines them with the cost table into tokens per step, seconds per step and tokens/s of
  ``ar``, ``sequential`` and ``parallel`` at a batch size and verification threshold. A step verifies the batch's
  longest verify length, so the step cost uses the maximum over the batch's rows (drawn from the profile). Where
  sequential steps verify trees (batch <= ``tree["batch"]``), ``predict_tree`` predicts them instead.
- ``crossover`` picks, per batch size, the best threshold of each mode and the best mode; the crossover batch is
  the smallest from which sequential is never behind parallel.
- The result lives in ``experiments/store/<device-slug>.json`` under a key naming the target, its dtype and the
  drafter, with the measurements behind it and their provenance. ``flex_policy`` reads it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.bench import write_json
from experiments.provenance import REPO, current_slug, provenance
from experiments.roofline import STEP_OPS, CostTable

SCHEMA = 1
STORE_DIR = Path(__file__).resolve().parent / "store"
STORE_ENV = "FLEXDRAFT_FLEX_STORE"     # a store file to use instead of the per-device default
THRESHOLDS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
STRATEGY = "cumulative_product"
SPEC_MODES = ("parallel", "sequential")
# A speculative mode is chosen over ar only when predicted this much faster. The harness predicts tokens/s within
# ~25% here (tests/test_flex.py), and a wrong speculative choice makes flex slower than plain decoding: measured on
# the AVX512-BF16 CPU, a predicted 1.16x for parallel at batch 1 ran at 0.81x ar on MT-bench.
SPECULATION_MARGIN = 1.2


# ---- the acceptance profile ----------------------------------------------------------------------------------------
def measure_acceptance(model, drafter, prompt_ids: list[list[int]], max_new_tokens: int,
                       stop_ids: list[int], source: str = "") -> dict:
    """Greedy decoding of one prompt at a time, drafted as the engine drafts at batch 1 (prompt-lookup copies of
    ``SpecConfig.lookup_len`` tokens where the text repeats, growing up to ``longest_copy`` while accepted whole,
    confidence 1), verifying every draft: one row per step.
    Larger batches copy no further than the drafter's B_s - 1 drafts, so their rows are the same steps cut there."""
    from flexdraft.sampling import SamplingParams
    from flexdraft.speculative import SpecConfig, generate_speculative

    def traced(spec: SpecConfig) -> list[dict]:
        trace = []
        for ids in prompt_ids:
            generate_speculative(model, drafter, [ids], max_new_tokens, SamplingParams(), [stop_ids],
                                 torch.arange(1), "sequential", spec, trace=trace)
        return trace

    # Sequential and parallel steps draft the same tokens; sequential is the cheaper way to verify all of them.
    full, spec = drafter.block_size - 1, SpecConfig()
    width = max(full, spec.lookup_len, spec.longest_copy)
    long = {"batch": spec.long_copy_batch, "accepted": [], "confidence": []}
    accepted, confidence = [], []
    for step in traced(SpecConfig(verify_threshold=0.0, tree_nodes=0)):
        conf, num, acc = step["confidence"][0].float(), int(step["num_drafts"][0]), int(step["accept_len"][0])
        # A row near max_new_tokens verifies fewer drafts than it holds: its acceptance is censored.
        if num == int((conf > 0).sum()):
            long["accepted"].append(acc)
            long["confidence"].append(F.pad(conf, (0, width - conf.numel())).round(decimals=4).tolist())
        if num >= full:
            accepted.append(min(acc, full))
            confidence.append(conf[:full].round(decimals=4).tolist())
    # Trees as the engine verifies them by default (its threshold, node budget and copies). Nodes per step are
    # recorded, not a verify length.
    tree = {"nodes": spec.tree_nodes, "threshold": spec.verify_threshold, "batch": spec.tree_batch,
            "accepted": [], "verified": [], "copied": []}
    for step in traced(spec):
        tree["accepted"] += step["accept_len"].tolist()
        tree["verified"] += step["num_drafts"].tolist()
        tree["copied"] += (step["confidence"] == 1).all(dim=1).tolist()
    return {"block_size": drafter.block_size, "accepted": accepted, "confidence": confidence, "long": long,
            "tree": tree if spec.tree_nodes else None,
            "source": source or f"engine, greedy, {len(prompt_ids)} prompts, {max_new_tokens} new tokens"}


def acceptance_from_stats(stats: dict, block_size: int, source: str) -> dict:
    """A profile from a stats JSON's ``accept_histogram`` (tokens gained per sequence and step, bonus included)."""
    accepted = [gained - 1 for gained, count in enumerate(stats["accept_histogram"]) if gained >= 1
                for _ in range(count)]
    return {"block_size": block_size, "accepted": accepted, "confidence": None, "source": source}


def acceptance_curve(profile: dict) -> list[float]:
    """Mean accepted drafts when verifying v drafts, v = 1 .. B_s - 1 (greedy: min(accepted of all, v))."""
    a = np.asarray(profile["accepted"])
    return [float(np.minimum(a, v).mean()) if a.size else 0.0 for v in range(1, profile["block_size"])]


# ---- prediction ------------------------------------------------------------------------------------------------------
def step_seconds(costs: CostTable, mode: str, batch: int, clean_tokens: int, context: float) -> float:
    """One decode step of ``mode``, ``clean_tokens`` = the batch's longest verify length + 1: the engine's step,
    the loop's bookkeeping and, in a speculative step, the prompt-lookup proposal (stores measured before it was an
    op leave it out)."""
    lookup = costs.time("lookup", batch, 1) if mode != "ar" and "lookup" in costs.points else 0.0
    return costs.time(STEP_OPS[mode], batch, clean_tokens, context) + costs.time("loop", batch, clean_tokens) + lookup


def chain_rows(profile: dict, batch: int) -> tuple[np.ndarray, list | None]:
    """(accepted drafts, confidences) per step as the engine verifies chains at this batch size: with long copies up
    to the profile's ``long["batch"]``, copies cut to the drafter's block above (and in profiles measured before the
    long view existed)."""
    long = profile.get("long")
    if long and long["accepted"] and batch <= long["batch"]:
        return np.asarray(long["accepted"]), long["confidence"]
    return np.asarray(profile["accepted"]), profile["confidence"]


def verify_lengths(confidence: list | None, rows: int, full: int, threshold: float | None,
                   strategy: str = STRATEGY) -> np.ndarray:
    """Drafts each of ``rows`` steps verifies at ``threshold``; all ``full`` where no confidences were recorded."""
    from flexdraft.speculative import SpecConfig, verify_len

    if confidence is None or threshold is None:
        return np.full(rows, full)
    return verify_len(torch.tensor(confidence, dtype=torch.float32), SpecConfig(threshold, strategy)).numpy()


def copied_rows(confidence: list | None) -> np.ndarray | None:
    """Per step, whether its drafts were all copies (confidence 1 in every slot that holds a draft)."""
    if confidence is None:
        return None
    conf = np.asarray(confidence)
    return (conf[:, 0] == 1) & ((conf == 1) | (conf == 0)).all(axis=1)


def draft_pass_skipped(costs: CostTable, copied: np.ndarray | None, rows: np.ndarray, block: int,
                       context: float) -> float:
    """Seconds a sequential step saves on average because its draft pass and draft head (which the ``step_sequential``
    op always times) run only where some row of the batch does not copy: ``copied`` per profile row (drafts all
    copies, confidence 1), ``rows`` [samples, batch] the sampled batches."""
    if copied is None or len(copied) == 0:
        return 0.0
    every_row_copies = float(np.asarray(copied, dtype=bool)[rows].all(axis=1).mean())
    return every_row_copies * draft_seconds(costs, rows.shape[1], block, context)


def draft_seconds(costs: CostTable, batch: int, block: int, context: float) -> float:
    """The draft pass and draft head that open a step after a sequential one (and that a copy step does without)."""
    return costs.time("draft", batch, block, context) + costs.time("head", batch, block - 1)


def predict_tree(costs: CostTable, profile: dict, batch: int, context: float = 256, samples: int = 400,
                 seed: int = 0) -> dict:
    """Sequential steps that verify trees (``profile["tree"]``): a step gains each row's accepted drafts + 1 and verifies
    the batch's largest tree. Its cost is the chain step's over a full block plus the target pass's extra query
    tokens (the ``target`` op's; the tree's visibility and the cache compaction are not timed apart)."""
    tree, block = profile["tree"], profile["block_size"]
    accepted, verified = np.asarray(tree["accepted"]), np.asarray(tree["verified"])
    rows = np.random.default_rng(seed).integers(0, accepted.size, (samples, batch))
    gained = (1 + accepted[rows]).sum(axis=1)
    chain = step_seconds(costs, "sequential", batch, block, context) - costs.time("target", batch, block, context)
    by_nodes = {int(n): chain + costs.time("target", batch, int(n) + 1, context)
                for n in np.unique(verified[rows].max(axis=1))}
    step = float(np.mean([by_nodes[int(n)] for n in verified[rows].max(axis=1)]))
    step -= draft_pass_skipped(costs, tree.get("copied"), rows, block, context)
    return {"tokens_per_step": float(gained.mean()), "step_s": step, "tokens_per_s": float(gained.mean()) / step,
            "verify_len": float(verified[rows].mean()), "tree_nodes": tree["nodes"]}


def trees_at(profile: dict, mode: str, batch: int) -> bool:
    """Whether the engine's ``mode`` steps verify trees at this batch size, and the profile says what they accept."""
    tree = profile.get("tree")
    return mode == "sequential" and bool(tree) and bool(tree["accepted"]) and batch <= tree["batch"]


def predict_decode(costs: CostTable, profile: dict, mode: str, batch: int, threshold: float | None = None,
                   context: float = 256, strategy: str = STRATEGY, samples: int = 400, seed: int = 0) -> dict:
    """Steady-state decoding at a constant batch: tokens per step, seconds per step and tokens/s. ``threshold`` does
    not apply to tree steps (measured at the engine's default threshold)."""
    if trees_at(profile, mode, batch):
        return predict_tree(costs, profile, batch, context, samples, seed)
    if mode == "ar":
        step = step_seconds(costs, "ar", batch, 1, context)
        return {"tokens_per_step": float(batch), "step_s": step, "tokens_per_s": batch / step, "verify_len": 0.0}
    accepted, confidence = chain_rows(profile, batch)
    if accepted.size == 0:
        raise ValueError("the acceptance profile is empty: measure it on more prompts or more new tokens")
    full = len(confidence[0]) if confidence else profile["block_size"] - 1
    v = verify_lengths(confidence, accepted.size, full, threshold, strategy)
    rows = np.random.default_rng(seed).integers(0, accepted.size, (samples, batch))
    verified = v[rows]
    gained = (1 + np.minimum(accepted[rows], verified)).sum(axis=1)
    longest = verified.max(axis=1)
    copied = copied_rows(confidence)
    all_copy = np.zeros(samples, dtype=bool) if copied is None else copied[rows].all(axis=1)
    draft = draft_seconds(costs, batch, profile["block_size"], context)
    # A step where every row copies runs no draft pass before it and, in parallel mode, verifies alone (a sequential
    # step's target pass); the parallel step after it opens with the draft pass (copies taken as independent).
    steps = {(int(n), bool(c)): step_seconds(costs, "sequential" if c else mode, batch, int(n) + 1, context)
             - (draft if c else 0.0) for n, c in set(zip(longest.tolist(), all_copy.tolist()))}
    step = float(np.mean([steps[(int(n), bool(c))] for n, c in zip(longest, all_copy)]))
    if mode == "parallel":
        step += float(all_copy.mean()) * float((~all_copy).mean()) * draft
    return {"tokens_per_step": float(gained.mean()), "step_s": step, "tokens_per_s": float(gained.mean()) / step,
            "verify_len": float(verified.mean())}


def predict_run(costs: CostTable, profile: dict, mode: str, batch: int, threshold: float | None,
                prompt_len: float, new_tokens: float, strategy: str = STRATEGY) -> float:
    """End-to-end tokens/s of ``batch`` prompts of ``prompt_len`` tokens, ``new_tokens`` each: prefill + decode."""
    block = profile["block_size"]
    context = prompt_len + new_tokens / 2
    p0 = next(iter(costs.points["prefill"]))[1]                       # the prompt length the harness measured
    prefill = costs.time("prefill", batch, p0) * prompt_len / p0     # compute-bound: linear in prompt tokens
    if mode != "ar":   # the speculative prefill also drafts a first block
        prefill += costs.time("draft", batch, block, prompt_len) + costs.time("head", batch, block - 1)
    decode = predict_decode(costs, profile, mode, batch, threshold, context, strategy)
    return batch * new_tokens / (prefill + batch * max(new_tokens - 1, 0) / decode["tokens_per_s"])


def crossover(costs: CostTable, profile: dict, batches, context: float, strategy: str = STRATEGY,
              thresholds=THRESHOLDS, margin: float = SPECULATION_MARGIN) -> dict:
    """Per batch size: every mode's prediction at its best threshold, and the choice (the faster speculative mode
    where it beats ar by ``margin``, else ar); the crossover batch."""
    if profile["confidence"] is None:
        thresholds = (None,)
    by_batch = {}
    for b in batches:
        row = {"ar": predict_decode(costs, profile, "ar", b, None, context, strategy)}
        for mode in SPEC_MODES:
            # Tree steps were measured at the engine's default threshold: None keeps it.
            tried = (None,) if trees_at(profile, mode, b) else thresholds
            row[mode] = max(({**predict_decode(costs, profile, mode, b, t, context, strategy), "verify_threshold": t}
                             for t in tried), key=lambda p: p["tokens_per_s"])
        best = max(SPEC_MODES, key=lambda m: row[m]["tokens_per_s"])
        speedup = row[best]["tokens_per_s"] / row["ar"]["tokens_per_s"]
        choice = best if speedup >= margin else "ar"
        # The best speculative mode even where ar is chosen: flex's controller weighs it against the acceptance a
        # generate call observes (FlexController).
        row["choice"] = {"mode": choice, "verify_threshold": row[choice].get("verify_threshold"),
                         "speculative": {"mode": best, "verify_threshold": row[best].get("verify_threshold"),
                                         "speedup": speedup, "tokens_per_step": row[best]["tokens_per_step"] / b}}
        by_batch[int(b)] = row
    crossing = None   # the smallest batch size from which sequential is never behind parallel
    for b in sorted(by_batch, reverse=True):
        if by_batch[b]["sequential"]["tokens_per_s"] < by_batch[b]["parallel"]["tokens_per_s"]:
            break
        crossing = b
    return {"context": context, "strategy": strategy, "crossover_batch": crossing, "by_batch": by_batch}


# ---- the per-device store --------------------------------------------------------------------------------------------
def store_file(slug: str | None = None) -> Path:
    """$FLEXDRAFT_FLEX_STORE when set, else ``experiments/store/<slug>.json`` (default: this machine's CPU)."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    return STORE_DIR / f"{slug or current_slug()}.json"


def fingerprint(tensors) -> str:
    h = hashlib.sha256()
    for tensor in tensors:
        sample = tensor.detach().flatten()[:: max(1, tensor.numel() // 4096)].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:12]


def entry_key(model, drafter) -> str:
    """Names what a store entry was measured with: the target's weights and dtype, the drafter's shape and weights."""
    from flexdraft.model import model_identity

    target = model_identity(model)
    dtype = str(model.dtype).removeprefix("torch.")
    tuned = model.config.num_layers - drafter.split_layer
    weights = fingerprint(t for _, t in sorted(drafter.state_dict().items()))
    return (f"{target['model_type']}-{target['num_layers']}L-{target['weights_sha']}-{dtype}"
            f"/drafter-{tuned}L-b{drafter.block_size}-{weights}")


def read_store(path: Path) -> dict:
    """The store at ``path``; {} when absent, or (with a warning) when malformed or of another schema."""
    if not path.is_file():
        return {}
    try:
        store = json.loads(path.read_text())
        if store.get("schema") != SCHEMA or not isinstance(store.get("entries"), dict):
            raise ValueError(f"not a flex store of schema {SCHEMA}")
        return store
    except (ValueError, OSError) as exc:
        warnings.warn(f"ignoring flex store {path}: {exc}")
        return {}


def reusable_entry(store: dict, key: str) -> tuple[str | None, dict | None]:
    """The newest entry measured with the same target, dtype and drafter shape as ``key`` (the drafter's weights
    change acceptance, not step costs)."""
    shape = key.rsplit("-", 1)[0]
    matches = {k: e for k, e in (store or {}).get("entries", {}).items() if k.rsplit("-", 1)[0] == shape}
    if not matches:
        return None, None
    newest = max(matches, key=lambda k: matches[k]["provenance"].get("created", ""))
    return newest, matches[newest]


def write_entry(path: Path, key: str, entry: dict) -> Path:
    """Add or replace one entry; the others stay."""
    store = read_store(path) or {"schema": SCHEMA, "device": entry["provenance"]["device"],
                                 "device_name": entry["provenance"]["device_name"], "entries": {}}
    store["entries"][key] = entry
    write_json(path, store, sort_keys=True)
    return path


def build_entry(costs_rows: list[dict], ceilings: dict, profile: dict, shape: dict, context: float,
                strategy: str = STRATEGY, command: str | None = None, device="cpu", extra: dict | None = None) -> dict:
    """A store entry: measurements, the prediction at the measured batch sizes, and the policy for every batch size
    up to the largest measured (beyond it, the largest's choice applies)."""
    costs = CostTable.from_rows(costs_rows)
    measured = sorted({r["batch"] for r in costs_rows})
    prediction = crossover(costs, profile, measured, context, strategy)
    policy = crossover(costs, profile, range(1, measured[-1] + 1), context, strategy)
    return {"provenance": provenance(device, command), "shape": shape, "ceilings": ceilings, "costs": costs_rows,
            "acceptance": profile, "acceptance_curve": acceptance_curve(profile), "prediction": prediction,
            "policy": {"crossover_batch": policy["crossover_batch"], "strategy": strategy, "context": context,
                       "choices": {str(b): row["choice"] for b, row in policy["by_batch"].items()}},
            **(extra or {})}


# ---- what --mode flex reads ------------------------------------------------------------------------------------------
def at_batch(table: dict, batch_size: int):
    """``table``'s entry for ``batch_size``: the largest listed batch size below it, else the smallest listed."""
    sizes = sorted(table)
    below = [s for s in sizes if s <= batch_size]
    return table[below[-1] if below else sizes[0]]


@dataclass
class FlexPolicy:
    """Flex Decoding's choice per batch size: ``policy(batch_size) -> (mode, verify_threshold)``.

    mode is "parallel", "sequential" or "ar" (where the prediction says speculation does not pay); a threshold of
    None keeps the caller's ``--verify-threshold``. Between listed batch sizes the largest listed one below applies.
    ``source`` says where the choices came from: a measured store entry, or the conservative default.
    ``speculative`` (measured entries): per batch size the best speculative mode, its threshold, its predicted
    speedup over ar and tokens per step per row, which ``FlexController`` weighs against observed acceptance.
    """
    choices: dict[int, tuple[str, float | None]]
    source: str
    speculative: dict[int, dict] | None = None

    def __call__(self, batch_size: int) -> tuple[str, float | None]:
        return at_batch(self.choices, batch_size)

    def modes_at(self, batch_size: int) -> set[str]:
        """The step modes this policy may run at ``batch_size`` (asking is free of side effects)."""
        return {self(batch_size)[0]}

    def controller(self) -> "FlexController | FlexPolicy":
        """The choices for one generate call, corrected by the acceptance it observes; without predictions to correct
        (the conservative default, older stores) the policy itself, which keeps no state."""
        return FlexController(self) if self.speculative else self

    def describe(self) -> str:
        """'parallel b1 (tau 0.01), sequential b2+': runs of equal choices over batch sizes."""
        runs = []
        for b in sorted(self.choices):
            if not runs or runs[-1][1] != self.choices[b]:
                runs.append((b, self.choices[b]))
        out = []
        for i, (first, (mode, tau)) in enumerate(runs):
            last = runs[i + 1][0] - 1 if i + 1 < len(runs) else None
            span = f"b{first}+" if last is None else (f"b{first}" if last == first else f"b{first}-{last}")
            out.append(f"{mode} {span}" + ("" if tau is None else f" (tau {tau:g})"))
        adapts = "; then as the acceptance observed in the call says" if self.speculative else ""
        return ", ".join(out) + adapts


# Measured acceptance leaves the step costs' error only: speculate where predicted this much faster than ar with it.
OBSERVED_MARGIN = 1.05
PRIOR_STEPS = 2       # the store's prediction weighs as much as this many observed speculative steps
# The observed / predicted acceptance is taken at most this high: HumanEval ran at 1.06-1.14x the pooled profile's
# tokens per step on the AMD host (MT-bench 0.68-0.84x), and a batch size whose prediction falls short of the margin
# even so is never probed. 1.5 let batch 2 probe there (sequential predicted 0.71x ar with the C row-wise ops; 0.57-
# 0.79x measured), and its probes cost 3-8% in the sweep at fcc3edb (flex 0.92 / 0.97x ar greedy): never probing, flex
# runs ar's own loop.
BEST_CASE = 1.3
# ar steps before a speculative step probes acceptance again, doubling while probes disappoint, up to a cap. A wasted
# probe costs a fraction of one speculative step, so at the cap probing costs a few percent. Where the prediction is a
# close call (within CLOSE_CALL of the margin at the predicted acceptance), whether speculation pays turns on the
# workload, and a high cap lets a call whose first answers accept little miss the later ones that pay: AMD host, batch
# 1 (sequential predicted 1.045x ar), replayed over 32 + 32 prompts (experiments/replay.py on
# reports/cpu-amd-epyc-avx512/replay-oracle.json), a cap of 64 left HumanEval's 8 bench prompts at 0.86x the best
# mode (6 probes in 244 steps), 16 at 1.02x (all 32: 0.96x -> 1.01x), MT-bench 1.00x either way. Elsewhere (batch 2
# then: 0.77x predicted) probes rarely pay and cost more: the high cap.
PROBE_GAP, MAX_PROBE_GAP, CLOSE_CALL_MAX_PROBE_GAP = 4, 64, 16
CLOSE_CALL = 1.1
# Overriding the store's ar takes evidence: the scale's lower bound, this many standard errors below its mean, must
# pay. One step's tokens per row vary a lot (MT-bench at batch 2: 1 to 4, the scale's step-to-step spread ~0.5), so a
# lucky probe or two moved the mean past the margin. AMD host, batch 2, 5 interleaved repetitions (greedy MT-bench,
# HumanEval, sampled MT-bench, HumanEval): flex on the mean 0.94 / 1.02 / 0.98 / 0.95x ar, on the bound
# 0.95 / 1.04 / 0.99 / 0.98x (sequential alone 0.76 / 1.07 / 0.69 / 0.87x).
EVIDENCE_Z = 1.0
PRIOR_SPREAD = 0.5    # the scale's step-to-step standard deviation before any observation, weighed as PRIOR_STEPS


def pays_at(scale: float, spec: dict) -> bool:
    """Whether ``spec``'s predicted speedup over ar, at ``scale`` x its predicted acceptance, reaches the margin."""
    return scale * spec["speedup"] >= OBSERVED_MARGIN


class FlexController:
    """Flex's step choices for one generate call: the store's policy, corrected by the acceptance the call observes.

    The store predicts each batch size's best speculative mode from an acceptance profile pooled over workloads, but
    one workload accepts more or less (AMD host, batch 1: MT-bench 0.68x the profile's tokens per step, HumanEval
    1.06x; sampling less than greedy). ``scale`` is observed / predicted tokens per step over the call's speculative
    steps, with the prediction counted as ``PRIOR_STEPS`` steps. A speculative step runs where scale x predicted
    speedup reaches ``OBSERVED_MARGIN`` (before any observation: the store's own choice), else an ar step. ar steps
    observe nothing, so after ``gap`` of them one speculative step probes again; a probe that does not pay doubles the
    gap, up to a cap that is lower where the prediction is a close call. Where the store chose ar, speculation must be
    earned: the scale's lower bound (``EVIDENCE_Z`` standard errors below) has to pay, not its mean. Choices depend on
    acceptance only, never on time: a call's output is reproducible.
    """

    def __init__(self, policy: FlexPolicy):
        self.policy = policy
        self.observed, self.steps = 0.0, 0    # sum of observed / predicted tokens per step, speculative steps seen
        self.observed_squares = 0.0           # and of their squares: the spread of one step's scale
        self.since_speculative, self.gap = 0, PROBE_GAP

    @property
    def source(self) -> str:
        return self.policy.source

    @property
    def scale(self) -> float:
        return min(BEST_CASE, self._mean())

    @property
    def scale_lower_bound(self) -> float:
        """The scale less ``EVIDENCE_Z`` standard errors: the prior's spread and the observed steps' pooled."""
        weight, mean = self.steps + PRIOR_STEPS, self._mean()
        deviations = self.observed_squares - 2 * mean * self.observed + self.steps * mean ** 2
        variance = (deviations + PRIOR_STEPS * (PRIOR_SPREAD ** 2 + (1 - mean) ** 2)) / weight
        return min(BEST_CASE, mean - EVIDENCE_Z * math.sqrt(variance / weight))

    def _mean(self) -> float:
        return (self.observed + PRIOR_STEPS) / (self.steps + PRIOR_STEPS)

    def pays(self, spec: dict) -> bool:
        if spec["speedup"] >= SPECULATION_MARGIN:   # the store's choice: kept until the observed mean says otherwise
            return self.steps == 0 or pays_at(self.scale, spec)
        return self.steps > 0 and pays_at(self.scale_lower_bound, spec)

    def may_speculate(self, spec: dict) -> bool:
        return spec["speedup"] >= SPECULATION_MARGIN or pays_at(BEST_CASE, spec)

    def __call__(self, batch_size: int) -> tuple[str, float | None]:
        spec = at_batch(self.policy.speculative, batch_size)
        probe = self.may_speculate(spec) and self.since_speculative >= self.gap
        return (spec["mode"], spec["verify_threshold"]) if self.pays(spec) or probe else ("ar", None)

    def modes_at(self, batch_size: int) -> set[str]:
        spec = at_batch(self.policy.speculative, batch_size)
        return {"ar", spec["mode"]} if self.may_speculate(spec) else {"ar"}

    def observe(self, mode: str, batch_size: int, tokens_per_row: float) -> None:
        """After each step: the mode it ran and the tokens it gained per row (bonus included)."""
        if mode == "ar":
            self.since_speculative += 1
            return
        spec = at_batch(self.policy.speculative, batch_size)
        probed = not self.pays(spec)
        ratio = tokens_per_row / spec["tokens_per_step"]
        self.observed += ratio
        self.observed_squares += ratio ** 2
        self.steps += 1
        self.since_speculative = 0
        if probed:   # a probe whose mean pays, its lower bound not yet, is promising: probe again soon
            promising = pays_at(self.scale, spec)
            cap = CLOSE_CALL_MAX_PROBE_GAP if pays_at(CLOSE_CALL, spec) else MAX_PROBE_GAP
            self.gap = PROBE_GAP if promising else min(2 * self.gap, cap)


def default_policy(reason: str) -> FlexPolicy:
    """Without measurements: parallel at batch 1 only, where its extra mask tokens are nearly free on any device;
    sequential above, whose cost grows gracefully with the batch; the caller's verification threshold."""
    return FlexPolicy({1: ("parallel", None), 2: ("sequential", None)},
                      f"conservative default (parallel at batch 1, sequential above): {reason}")


def policy_from_entry(entry: dict, source: str) -> FlexPolicy:
    stored = {int(b): c for b, c in entry["policy"]["choices"].items()}
    choices = {b: (c["mode"], c["verify_threshold"]) for b, c in stored.items()}
    speculative = {b: c["speculative"] for b, c in stored.items() if "speculative" in c}   # absent in older stores
    return FlexPolicy(choices, source, speculative if len(speculative) == len(stored) else None)


def flex_policy(model, drafter, path: str | Path | None = None) -> FlexPolicy:
    """The policy measured on this device for this target, dtype and drafter (``flexdraft roofline``), else the
    conservative default; ``policy.source`` says which, and why."""
    path = Path(path) if path is not None else store_file(current_slug(model.device))
    shown = os.path.relpath(path, REPO) if path.is_absolute() and REPO in path.parents else str(path)
    store = read_store(path)
    if not store:
        return default_policy(f"no flex store at {shown}; run `flexdraft roofline` to measure this device")
    key = entry_key(model, drafter)
    entry = store["entries"].get(key)
    if entry is None:
        return default_policy(f"{shown} has no entry for {key}; run `flexdraft roofline` with this model, dtype "
                              "and drafter")
    created = entry["provenance"].get("created", "?")
    return policy_from_entry(entry, f"measured: {shown} [{key}], {created}")
