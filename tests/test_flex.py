"""Flex decoding: the crossover from a cost table and an acceptance profile, the per-device store, losslessness with
a policy that changes as the batch shrinks, and the harness's predictions against measured tokens/s."""
import statistics
import time

import numpy as np
import pytest
import torch

from experiments.crossover import (FlexPolicy, build_entry, crossover, entry_key, flex_policy, predict_decode,
                                   predict_run, read_store, reusable_entry, write_entry)
from experiments.roofline import QUICK, CostTable, Shape, grid_points, work
from flexdraft.drafter import Drafter
from flexdraft.generate import generate_ar
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import SpecConfig, generate_speculative
from helpers import StubTokenizer, random_prompts, tiny_target

# A synthetic cost table: the roofline's floor at every point plus a fixed overhead per call, for Qwen3-8B's shape
# (bf16, 10 tuned layers) on an H200's ceilings (as measured for this project: 4.3 TB/s, 790 TFLOP/s).
QWEN3_8B = Shape(layers=36, tuned=10, block=16, hidden=4096, intermediate=12288, vocab=151936, heads=32, kv_heads=8,
                 head_dim=128, rank=512, itemsize=2)
H200 = {"bandwidth": 4.3e12, "peak_flops": 790e12}


def synthetic_costs(shape=QWEN3_8B, ceilings=H200, batches=(1, 2, 4, 8, 16, 32), overhead=2e-4):
    grid = QUICK.__class__(batches=batches, tokens=(1, 2, 4, 8, 16), contexts=(256,), prompt_len=128,
                           max_call_tokens=None)
    rows = []
    for op, b, q, ctx in grid_points(grid, shape.block, shape.tuned / shape.layers):
        flops, moved = work(op, shape, b, q, ctx)
        seconds = max(moved / ceilings["bandwidth"], flops / ceilings["peak_flops"]) + overhead
        rows.append({"op": op, "batch": b, "tokens": q, "context": ctx, "seconds": seconds, "flops": flops,
                     "bytes": moved})
    return rows


def synthetic_profile(mean_accepted: float, block=16, rows=2000, seed=0):
    """Geometric acceptance; a confidence that knows it (high before the first miss, low after)."""
    rng = np.random.default_rng(seed)
    p = mean_accepted / (1 + mean_accepted)
    accepted = np.minimum(rng.geometric(1 - p, rows) - 1, block - 1)
    slots = np.arange(block - 1)[None, :]
    confidence = np.where(slots < accepted[:, None], 0.9, 0.2) * rng.uniform(0.9, 1.0, (rows, block - 1))
    return {"block_size": block, "accepted": accepted.tolist(), "confidence": confidence.round(4).tolist(),
            "source": "synthetic"}


def test_flex_picks_parallel_at_batch_1_and_sequential_at_large_batch():
    costs = CostTable.from_rows(synthetic_costs())
    result = crossover(costs, synthetic_profile(3.0), [1, 2, 4, 8, 16, 32], context=256)
    choice = {b: row["choice"]["mode"] for b, row in result["by_batch"].items()}
    assert choice[1] == "parallel" and choice[32] == "sequential"
    assert 1 < result["crossover_batch"] <= 32
    # Below the crossover parallel wins, from it on sequential does (a single switch).
    for b, row in result["by_batch"].items():
        par, seq = row["parallel"]["tokens_per_s"], row["sequential"]["tokens_per_s"]
        assert (seq >= par) == (b >= result["crossover_batch"])
    # At large batch the best threshold verifies fewer drafts than at batch 1: extra tokens stop being free.
    assert result["by_batch"][32]["parallel"]["verify_len"] <= result["by_batch"][1]["parallel"]["verify_len"]


def test_flex_falls_back_to_ar_when_nothing_is_accepted():
    costs = CostTable.from_rows(synthetic_costs())
    result = crossover(costs, synthetic_profile(0.0), [1, 8, 32], context=256)
    assert {row["choice"]["mode"] for row in result["by_batch"].values()} == {"ar"}


def test_speculation_must_beat_ar_by_the_margin():
    """A speculative mode predicted only a little faster than ar is not chosen: the prediction's own error is larger."""
    costs = CostTable.from_rows(synthetic_costs())
    rows = crossover(costs, synthetic_profile(3.0), [1, 32], context=256, margin=1.0)["by_batch"]
    gain = {b: max(row[m]["tokens_per_s"] for m in ("parallel", "sequential")) / row["ar"]["tokens_per_s"]
            for b, row in rows.items()}
    assert all(g > 1 for g in gain.values()) and {row["choice"]["mode"] for row in rows.values()} != {"ar"}
    above = crossover(costs, synthetic_profile(3.0), [1, 32], context=256, margin=max(gain.values()) * 1.01)
    assert {row["choice"]["mode"] for row in above["by_batch"].values()} == {"ar"}
    assert above["by_batch"][1]["choice"]["verify_threshold"] is None
    # Where ar is chosen, the best speculative mode is kept for flex's controller, with its predicted speedup.
    for b, row in above["by_batch"].items():
        spec = row["choice"]["speculative"]
        assert spec["mode"] in ("parallel", "sequential") and spec["speedup"] == pytest.approx(gain[b])
        assert spec["tokens_per_step"] == pytest.approx(row[spec["mode"]]["tokens_per_step"] / b)


def test_prediction_counts_the_longest_verify_length_of_the_batch():
    costs = CostTable.from_rows(synthetic_costs())
    profile = synthetic_profile(2.0)
    one = predict_decode(costs, profile, "sequential", 1, 0.1, 256)
    many = predict_decode(costs, profile, "sequential", 16, 0.1, 256)
    assert many["tokens_per_step"] == pytest.approx(16 * one["tokens_per_step"], rel=0.1)
    assert many["step_s"] > one["step_s"]


def test_tree_steps_are_predicted_from_the_tree_profile_where_the_engine_verifies_trees():
    """At batch <= the profile's tree batch, sequential is predicted from what trees accepted and the nodes they
    verified: the chain step over a full block plus the target pass's extra query tokens; above it, from the chain."""
    costs = CostTable.from_rows(synthetic_costs())
    chain = synthetic_profile(1.0)
    tree = {**chain, "tree": {"nodes": 8, "threshold": 0.01, "batch": 1, "accepted": [3, 2, 3, 1] * 50,
                              "verified": [8] * 200}}
    got = predict_decode(costs, tree, "sequential", 1, 0.1, 256)
    # Rows are drawn from the profile (400 draws): its mean of 2.25 accepted drafts, within sampling noise.
    assert got["tokens_per_step"] == pytest.approx(1 + 2.25, rel=0.05) and got["verify_len"] == 8
    full = predict_decode(costs, chain, "sequential", 1, None, 256)   # a chain verifying all 15 drafts
    assert got["step_s"] == pytest.approx(full["step_s"] - costs.time("target", 1, 16, 256)
                                          + costs.time("target", 1, 9, 256))
    assert predict_decode(costs, tree, "sequential", 2, 0.1, 256) == predict_decode(costs, chain, "sequential", 2,
                                                                                     0.1, 256)
    assert predict_decode(costs, tree, "parallel", 1, 0.1, 256) == predict_decode(costs, chain, "parallel", 1, 0.1, 256)
    row = crossover(costs, tree, [1], context=256)["by_batch"][1]
    assert row["sequential"]["verify_threshold"] is None and row["sequential"]["tree_nodes"] == 8


def test_speculative_steps_pay_for_the_lookup_proposal_and_ar_steps_do_not():
    """Every speculative step looks for a prompt-lookup copy (the engine's default); an ``ar`` step does not. Stores
    measured before the ``lookup`` op existed predict without it."""
    from experiments.crossover import step_seconds

    rows = [r for r in synthetic_costs() if r["op"] != "lookup" or r["batch"] != 4] + [
        {"op": "lookup", "batch": 4, "tokens": 16, "context": 0, "seconds": 0.5, "flops": 0.0, "bytes": 0.0}]
    costs = CostTable.from_rows(rows)
    base = {m: costs.time(op, 4, 5, 256) + costs.time("loop", 4, 5) for m, op in
            (("ar", "step_ar"), ("sequential", "step_sequential"), ("parallel", "step_parallel"))}
    assert step_seconds(costs, "ar", 4, 5, 256) == pytest.approx(base["ar"])
    for mode in ("sequential", "parallel"):
        assert step_seconds(costs, mode, 4, 5, 256) == pytest.approx(base[mode] + 0.5)
    old = CostTable.from_rows([r for r in rows if r["op"] != "lookup"])
    assert step_seconds(old, "sequential", 4, 5, 256) == pytest.approx(base["sequential"])


def test_sequential_steps_skip_the_draft_pass_where_every_row_copies():
    """The step_sequential op times the draft pass that opens the next step; the engine skips it where every row of
    the batch copies its drafts (confidence 1), so the prediction takes off its share."""
    costs = CostTable.from_rows(synthetic_costs())
    profile = synthetic_profile(2.0)
    copies = {**profile, "confidence": [[1.0] * 15] * len(profile["accepted"])}
    draft = costs.time("draft", 1, 16, 256) + costs.time("head", 1, 15)
    full = predict_decode(costs, profile, "sequential", 1, None, 256)
    assert predict_decode(costs, copies, "sequential", 1, None, 256)["step_s"] == pytest.approx(full["step_s"] - draft)
    # A parallel step whose rows all copy verifies alone: the sequential step without its draft pass.
    assert predict_decode(costs, copies, "parallel", 1, None, 256)["step_s"] == pytest.approx(full["step_s"] - draft)
    half = {**profile, "confidence": [[1.0] * 15 if i % 2 else c for i, c in enumerate(profile["confidence"])]}
    one, many = (predict_decode(costs, half, "sequential", b, None, 256) for b in (1, 8))
    assert one["step_s"] < predict_decode(costs, profile, "sequential", 1, None, 256)["step_s"]
    # In parallel mode a copy step leaves no drafts: the parallel step after it opens with the draft pass.
    copy_share = predict_decode(costs, half, "parallel", 1, None, 256, samples=4000)
    parallel = predict_decode(costs, profile, "parallel", 1, None, 256)["step_s"]
    expected = 0.5 * (full["step_s"] - draft) + 0.5 * parallel + 0.25 * draft
    assert copy_share["step_s"] == pytest.approx(expected, rel=0.05)
    # At batch 8 every row must copy: 1 in 256 batches.
    assert many["step_s"] == pytest.approx(predict_decode(costs, profile, "sequential", 8, None, 256)["step_s"],
                                           rel=0.01)


def test_long_copies_are_predicted_where_the_engine_drafts_them():
    """At batch <= the profile's ``long["batch"]`` copies run past the drafter's block (the engine's lookup_len), and
    the chain steps are predicted from those rows; larger batches from the rows cut to the block."""
    costs = CostTable.from_rows(synthetic_costs())
    profile = synthetic_profile(2.0)
    width = 24
    pad = lambda c: c + [0.0] * (width - len(c))   # noqa: E731
    long_rows = [pad([1.0] * 20) if i % 4 == 0 else pad(c) for i, c in enumerate(profile["confidence"])]
    long_accepted = [18 if i % 4 == 0 else a for i, a in enumerate(profile["accepted"])]
    long = {**profile, "long": {"batch": 1, "accepted": long_accepted, "confidence": long_rows}}
    for mode in ("sequential", "parallel"):
        one, cut = predict_decode(costs, long, mode, 1, 0.1, 256), predict_decode(costs, profile, mode, 1, 0.1, 256)
        assert one["tokens_per_step"] > cut["tokens_per_step"] + 2 and one["verify_len"] > cut["verify_len"]
        assert predict_decode(costs, long, mode, 2, 0.1, 256) == predict_decode(costs, profile, mode, 2, 0.1, 256)
    # Every row a 20-token copy: 20 drafts verified whatever the threshold, without a draft pass or mask groups.
    copies = {**profile, "long": {"batch": 1, "accepted": [19] * 100, "confidence": [pad([1.0] * 20)] * 100}}
    got = predict_decode(costs, copies, "parallel", 1, 0.9, 256)
    assert got["verify_len"] == 20 and got["tokens_per_step"] == 20
    assert got == predict_decode(costs, copies, "sequential", 1, 0.9, 256)


def test_policy_between_batch_sizes_and_beyond():
    policy = FlexPolicy({1: ("parallel", 0.1), 3: ("sequential", None), 8: ("ar", None)}, "test")
    assert [policy(b)[0] for b in (1, 2, 3, 7, 8, 100)] == ["parallel", "parallel", "sequential", "sequential", "ar",
                                                               "ar"]
    assert policy.describe() == "parallel b1-2 (tau 0.1), sequential b3-7, ar b8+"


# A store's predictions as the AMD host measured them (batch 1: sequential trees 1.44x ar at 2.5 tokens per step;
# batch 2: parallel 0.95x; batch 8: 0.62x).
PREDICTED = {1: {"mode": "sequential", "verify_threshold": None, "speedup": 1.44, "tokens_per_step": 2.5},
             2: {"mode": "parallel", "verify_threshold": 0.1, "speedup": 0.95, "tokens_per_step": 1.7},
             8: {"mode": "sequential", "verify_threshold": 0.03, "speedup": 0.62, "tokens_per_step": 1.75}}
PREDICTED_POLICY = FlexPolicy({1: ("sequential", None), 2: ("ar", None)}, "test", PREDICTED)


def run_controller(controller, batch_size, tokens_per_row, steps):
    """``steps`` steps at one batch size, each speculative one gaining ``tokens_per_row`` (or the next of a list, the
    last repeating); the modes chosen."""
    gains = list(tokens_per_row) if isinstance(tokens_per_row, (list, tuple)) else [tokens_per_row]
    modes, observe = [], getattr(controller, "observe", lambda *_: None)   # a plain policy observes nothing
    for _ in range(steps):
        mode, _threshold = controller(batch_size)
        gain = (gains.pop(0) if len(gains) > 1 else gains[0]) if mode != "ar" else 1.0
        observe(mode, batch_size, gain)
        modes.append(mode)
    return modes


def test_flex_stops_speculating_where_the_observed_acceptance_does_not_pay_and_probes_ever_less_often():
    controller = PREDICTED_POLICY.controller()
    modes = run_controller(controller, 1, 1.6, 40)     # MT-bench sampled: 0.64x the predicted tokens per step
    assert modes[0] == "sequential" and modes[-1] == "ar"
    probes = [i for i, m in enumerate(modes) if m == "sequential"]
    gaps = np.diff(probes)[-3:] - 1                    # ar steps between the last probes: doubling
    assert gaps.tolist() == [4, 8, 16]
    assert controller.scale * PREDICTED[1]["speedup"] < 1.05


def test_flex_speculates_where_the_store_chose_ar_once_the_observed_acceptance_pays():
    controller = PREDICTED_POLICY.controller()
    modes = run_controller(controller, 2, 2.4, 40)      # HumanEval at batch 2: 1.4x the predicted tokens per step
    # Promising probes come every 4 ar steps until the scale's lower bound pays; then flex stays speculative.
    first = modes.index("parallel")
    steady = max(i for i, m in enumerate(modes) if m == "ar") + 1
    assert first == 4 and steady <= 25 and set(modes[steady:]) == {"parallel"}
    assert all(modes[i - 4:i] == ["ar"] * 4 for i, m in enumerate(modes[:steady]) if m == "parallel")
    assert controller(2) == ("parallel", 0.1)
    # Where the prediction falls short even at the best case, flex never probes: plain ar.
    assert controller.modes_at(8) == {"ar"} and set(run_controller(controller, 8, 9.0, 100)) == {"ar"}
    assert controller.modes_at(1) == {"ar", "sequential"} and controller.modes_at(2) == {"ar", "parallel"}


def test_a_lucky_probe_does_not_turn_flex_to_speculation_where_the_store_chose_ar():
    """Batch 2 where speculation does not pay (1.5 tokens per row, 0.88x the prediction), whose first probe was lucky
    (4 tokens): the scale's mean then pays, its lower bound does not, so flex stays with ar and probes ever less
    often."""
    controller = PREDICTED_POLICY.controller()
    assert run_controller(controller, 2, [4.0, 1.5], 5) == ["ar"] * 4 + ["parallel"]
    assert controller.scale * PREDICTED[2]["speedup"] >= 1.05 > controller.scale_lower_bound * PREDICTED[2]["speedup"]
    modes = ["parallel"] + run_controller(controller, 2, 1.5, 60)
    probes = [i for i, m in enumerate(modes) if m == "parallel"]
    assert np.diff(probes).min() > 1 and np.diff(probes)[-1] > np.diff(probes)[0]   # lone probes, spreading out
    assert controller.scale * PREDICTED[2]["speedup"] < 1.05


def test_where_the_store_chose_ar_by_a_hair_flex_keeps_probing_so_that_rising_acceptance_turns_it():
    """Batch 1, sequential predicted 1.0x ar (the AMD host's 1.045x): a call's first answers accept little (2.0 tokens
    per step, 0.8x the prediction), its later ones twice the prediction (5.0). The probe gap stops growing at 16
    there, so the later answers are probed and speculated on (with the gap left to grow to 64, flex probed once in
    those 100 steps). Where the prediction is far from paying (batch 2, 0.85x: within the best case, not a close call)
    the gap grows to 64: probes rarely pay there and cost more."""
    close_call = {1: {"mode": "sequential", "verify_threshold": None, "speedup": 1.0, "tokens_per_step": 2.5},
                  2: {"mode": "parallel", "verify_threshold": 0.1, "speedup": 0.85, "tokens_per_step": 1.7}}
    policy = FlexPolicy({1: ("ar", None)}, "test", close_call)

    def probe_gaps(modes):
        return np.diff([i for i, m in enumerate(modes) if m != "ar"]) - 1

    controller = policy.controller()
    assert probe_gaps(run_controller(controller, 1, 2.0, 150))[-3:].tolist() == [16, 16, 16]
    later = run_controller(controller, 1, 5.0, 100)
    assert later.index("sequential") <= 16 and set(later[-30:]) == {"sequential"}
    assert probe_gaps(run_controller(policy.controller(), 2, 1.3, 300))[-2:].tolist() == [64, 64]


def test_flex_keeps_speculating_where_the_observed_acceptance_pays():
    controller = PREDICTED_POLICY.controller()
    assert set(run_controller(controller, 1, 2.3, 30)) == {"sequential"}   # 0.92x the prediction: 1.32x ar
    # A policy without predictions (the conservative default, older stores) is followed as it is.
    plain = FlexPolicy({1: ("parallel", None), 2: ("sequential", None)}, "default").controller()
    assert run_controller(plain, 1, 1.0, 5) == ["parallel"] * 5 and plain.modes_at(2) == {"sequential"}


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_target("llama", seed=3, max_position_embeddings=512)
    return model, Drafter.initialise(model, num_tuned_layers=2, block_size=4, seed=0)


def test_store_round_trip_and_default(tiny, tmp_path):
    model, drafter = tiny
    path = tmp_path / "store.json"
    policy = flex_policy(model, drafter, path)
    assert policy.source.startswith("conservative default") and "flexdraft roofline" in policy.source
    assert policy(1)[0] == "parallel" and policy(2)[0] == "sequential" and policy(64)[1] is None
    rows = synthetic_costs(Shape.of(model, drafter), batches=(1, 2, 4))
    entry = build_entry(rows, {**H200, "samples": {}}, synthetic_profile(2.0, block=4, rows=200), {}, context=64,
                        command="test")
    write_entry(path, entry_key(model, drafter), entry)
    policy = flex_policy(model, drafter, path)
    assert policy.source.startswith("measured:") and entry_key(model, drafter) in policy.source
    assert sorted(policy.choices) == [1, 2, 3, 4]
    assert all(mode in ("ar", "parallel", "sequential") for mode, _ in policy.choices.values())
    other = Drafter.initialise(model, num_tuned_layers=2, block_size=4, seed=1)
    assert "has no entry" in flex_policy(model, other, path).source
    # Another drafter of the same shape can reuse the step costs (--reuse-costs); another block size cannot.
    assert reusable_entry(read_store(path), entry_key(model, other))[0] == entry_key(model, drafter)
    wider = Drafter.initialise(model, num_tuned_layers=2, block_size=5, seed=0)
    assert reusable_entry(read_store(path), entry_key(model, wider)) == (None, None)


@pytest.mark.parametrize("batch1, trees", [("parallel", False), ("sequential", True), ("ar", False)])
def test_tree_candidates_are_drafted_only_where_a_tree_step_can_run(tiny, monkeypatch, batch1, trees):
    """Each slot's likeliest candidates (the full calibrated logits) are drafted only where the policy runs sequential
    steps at a batch size that verifies trees (SpecConfig.tree_batch); a flex policy running parallel there does not
    pay for them."""
    import flexdraft.speculative

    model, drafter = tiny
    calls = []
    original = flexdraft.speculative.calibrated_logits
    monkeypatch.setattr(flexdraft.speculative, "calibrated_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    policy = FlexPolicy({1: (batch1, None), 2: ("parallel", None), 3: ("sequential", None)}, "t")
    prompts = random_prompts(model.config.vocab_size, [9], seed=21)
    expected, _ = generate_ar(model, prompts, 12, SamplingParams(), [[-1]], torch.arange(1))
    got, _ = generate_speculative(model, drafter, prompts, 12, SamplingParams(), [[-1]], torch.arange(1), policy,
                                  SpecConfig(verify_threshold=0.0))
    assert got.results()[0] == expected.results()[0]
    assert bool(calls) == trees


@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_flex_by_batch_size_is_lossless_as_the_batch_shrinks(tiny, batch_size):
    """The policy switches mode as stops shrink the batch; greedy output still equals autoregressive decoding."""
    model, drafter = tiny
    prompts = random_prompts(model.config.vocab_size, [2 + (7 * i) % 9 for i in range(batch_size)], seed=batch_size)
    free, _ = generate_ar(model, prompts, 20, SamplingParams(), [[-1]] * batch_size, torch.arange(batch_size))
    stops = [[free.results()[0][i][2 + 3 * i]] for i in range(batch_size)]   # each row stops at its own step
    policy = FlexPolicy({1: ("parallel", 0.0), 2: ("ar", None), 3: ("sequential", 0.2), 5: ("parallel", None)}, "t")
    expected, _ = generate_ar(model, prompts, 20, SamplingParams(), stops, torch.arange(batch_size))
    got, stats = generate_speculative(model, drafter, prompts, 20, SamplingParams(), stops, torch.arange(batch_size),
                                      policy, SpecConfig(verify_threshold=0.0))
    assert got.results() == expected.results()
    assert sum(stats.mode_steps.values()) == stats.target_forwards - 1
    if batch_size == 6:
        assert len(stats.mode_steps) >= 3       # sequential, ar and parallel all ran while the batch shrank


def test_a_parallel_step_right_after_ar_steps_verifies_its_chain_alone(tiny, monkeypatch):
    """Flex's first speculative step after ar steps (a probe, or a switch) runs as a sequential chain: no mask groups
    (they draft for a next step a probe may not take) and no tree (the acceptance observed is the chain's a parallel
    step verifies). Parallel steps after it run parallel, a chosen sequential step still verifies a tree, and greedy
    output equals ar's."""
    import flexdraft.speculative as speculative

    model, drafter = tiny
    trace, trees = [], []
    tree_step = speculative.TREE_STEPS["sequential"]
    monkeypatch.setitem(speculative.TREE_STEPS, "sequential",
                        lambda *a, **k: trees.append(len(trace) - 1) or tree_step(*a, **k))
    # the first choice is the prefill's: ar, so it drafts nothing
    script = iter(["ar", "ar", "parallel", "parallel", "ar", "parallel", "sequential", "parallel"] + ["ar"] * 40)
    prompts = random_prompts(model.config.vocab_size, [7], seed=5)
    expected, _ = generate_ar(model, prompts, 24, SamplingParams(), [[-1]], torch.arange(1))
    got, _ = generate_speculative(model, drafter, prompts, 24, SamplingParams(), [[-1]], torch.arange(1),
                                  lambda batch_size: next(script), SpecConfig(verify_threshold=0.0, lookup=False),
                                  trace=trace)
    assert got.results() == expected.results()
    assert [step["mode"] for step in trace[:7]] == ["ar", "sequential", "parallel", "ar", "sequential", "sequential",
                                                    "parallel"]
    assert trees == [5]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_flex_that_learns_from_acceptance_hears_every_step_and_stays_lossless(tiny, params):
    """An untrained drafter accepts far less than the store predicts: the controller hears each step's gain, turns to
    ar steps and probes now and then. Greedy output equals ar; sampled output is what the same seeds give again."""
    model, drafter = tiny
    prompts = random_prompts(model.config.vocab_size, [5, 9, 3], seed=4)
    optimistic = {1: {**PREDICTED[1], "tokens_per_step": 4.0},
                  2: {**PREDICTED[2], "speedup": 1.3, "tokens_per_step": 3.0}}
    policy = FlexPolicy({1: ("sequential", None), 2: ("parallel", 0.1)}, "test", optimistic)
    stops = [[-1]] * 3

    def run():
        controller, heard = policy.controller(), []
        listen = controller.observe
        controller.observe = lambda *a: heard.append(a) or listen(*a)
        out, stats = generate_speculative(model, drafter, prompts, 40, params, stops, torch.arange(3), controller)
        return out.results(), stats, heard, controller

    got, stats, heard, controller = run()
    assert len(heard) == sum(stats.mode_steps.values()) and [b for _, b, _ in heard] == sorted(
        (b for _, b, _ in heard), reverse=True)
    speculative_steps = sum(n for m, n in stats.mode_steps.items() if m != "ar")
    assert "ar" in stats.mode_steps and speculative_steps > 0 and controller.steps == speculative_steps
    assert controller.scale < 1
    if params.greedy:
        expected, _ = generate_ar(model, prompts, 40, params, stops, torch.arange(3))
        assert got == expected.results()
    again, stats_again, _, _ = run()
    assert again == got and stats_again.mode_steps == stats.mode_steps


@pytest.mark.parametrize("choices, predicted, speculative_runs", [
    ({1: ("ar", None)}, None, False),
    ({1: ("ar", None), 2: ("sequential", None)}, None, True),
    ({1: ("ar", None)}, {1: PREDICTED[8]}, False),      # never worth a probe
    ({1: ("ar", None)}, {1: PREDICTED[2]}, True)],      # probes: the observed acceptance may pay
    ids=["ar-everywhere", "sequential-from-2", "ar-predicted-far-below", "ar-predicted-near"])
def test_flex_that_picks_ar_everywhere_runs_the_plain_ar_loop(tiny, monkeypatch, choices, predicted,
                                                              speculative_runs):
    """The CPU's measured case: no drafter work at all where flex picks ar at every batch size a chunk can reach,
    and no speculative step can pay even at the best acceptance it may observe. Each call learns afresh."""
    import experiments.crossover
    import flexdraft.speculative
    from flexdraft.api import FlexDraft

    model, drafter = tiny

    calls = []
    original = flexdraft.speculative.generate_speculative
    monkeypatch.setattr(flexdraft.speculative, "generate_speculative",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(experiments.crossover, "flex_policy", lambda *_: FlexPolicy(choices, "test", predicted))
    fd = FlexDraft(model, StubTokenizer(), "tiny", drafter)
    prompts = random_prompts(model.config.vocab_size, [3, 8, 5], seed=11)
    ar = fd.generate(prompt_ids=prompts, mode="ar", max_new_tokens=10, batch_size=2)
    flex = fd.generate(prompt_ids=prompts, mode="flex", max_new_tokens=10, batch_size=2)
    assert [o["token_ids"] for o in flex.outputs] == [o["token_ids"] for o in ar.outputs]
    assert bool(calls) == speculative_runs
    again = fd.generate(prompt_ids=prompts, mode="flex", max_new_tokens=10, batch_size=2)
    assert again.outputs == flex.outputs and again.stats.mode_steps == flex.stats.mode_steps
    if not speculative_runs:
        assert flex.stats.mode_steps == {"ar": flex.stats.target_forwards - 2} and flex.stats.mask_tokens == 0


# The stated tolerance on this shared 2-core CPU: the geometric mean of predicted / measured tokens/s within 25% of 1
# (a systematic modelling error shows there) and every point within a factor of 1.75. Cost points and engine runs
# are timed interleaved, one pass over all of them per repetition, in this thread's CPU time (tests run torch on
# one thread), so load that other processes put on the machine reaches both sides alike. Not all of it: on this
# shared VM a burst of neighbours' load still moved one measurement's mean to 1.27-1.29 (3 of 9 runs in session 30,
# ar at batch 4 among the worst points, which no change of the model touches), so a miss is measured once more: a
# modelling error misses both times.
POINT_TOLERANCE, MEAN_TOLERANCE = 1.75, 1.25
ATTEMPTS = 2


@pytest.mark.serial
def test_predictions_agree_with_measured_tokens_per_s(tiny):
    from experiments.crossover import measure_acceptance
    from experiments.roofline import cost_calls, cost_rows, time_interleaved

    model, drafter = tiny
    grid, new_tokens, modes = QUICK, 24, ("ar", "sequential", "parallel")
    profile = measure_acceptance(model, drafter, random_prompts(model.config.vocab_size, [grid.prompt_len] * 8, 1),
                                 new_tokens, [-1])
    thresholds = dict(zip(modes, (None, 0.1, 0.0)))

    def run(b, mode):   # no stops: the batch stays full, as the prediction assumes
        prompts = random_prompts(model.config.vocab_size, [grid.prompt_len] * b, seed=100 + b)
        if mode == "ar":
            return lambda: generate_ar(model, prompts, new_tokens, SamplingParams(), [[-1]] * b, torch.arange(b))
        return lambda: generate_speculative(model, drafter, prompts, new_tokens, SamplingParams(), [[-1]] * b,
                                            torch.arange(b), mode, SpecConfig(thresholds[mode]))

    runs = {("run", b, mode): run(b, mode) for b in grid.batches for mode in modes}

    def predicted_over_measured() -> dict:
        samples = time_interleaved({**cost_calls(model, drafter, grid), **runs}, 5, grid.min_sample_s, "cpu",
                                   time.thread_time)
        costs = CostTable.from_rows(cost_rows(samples, model, drafter))
        ratios = {}
        for _, b, mode in runs:
            measured = b * new_tokens / statistics.median(samples[("run", b, mode)])
            predicted = predict_run(costs, profile, mode, b, thresholds[mode], grid.prompt_len, new_tokens)
            ratios[(b, mode)] = predicted / measured
        return ratios

    def within(ratios: dict) -> bool:
        worst = max(ratios.values(), key=lambda r: abs(np.log(r)))
        mean = float(np.exp(np.mean(np.log(list(ratios.values())))))
        return 1 / MEAN_TOLERANCE <= mean <= MEAN_TOLERANCE and 1 / POINT_TOLERANCE <= worst <= POINT_TOLERANCE

    attempts = []
    for _ in range(ATTEMPTS):
        attempts.append(predicted_over_measured())
        if within(attempts[-1]):
            break
    assert within(attempts[-1]), attempts


@pytest.mark.real_model
def test_flex_on_the_default_model_says_where_its_policy_comes_from(capsys):
    import json

    from flexdraft.cli import main

    outputs = {}
    for mode in ("ar", "flex"):
        assert main(["generate", "--prompt", "Name a color.", "--mode", mode, "--drafter", "untrained",
                     "--max-new-tokens", "8", "--json"]) == 0
        outputs[mode] = json.loads(capsys.readouterr().out)
    assert outputs["flex"]["outputs"][0]["token_ids"] == outputs["ar"]["outputs"][0]["token_ids"]
    assert outputs["flex"]["policy"].startswith(("measured:", "conservative default"))
    assert "policy" not in outputs["ar"]


def test_a_cost_point_is_the_lower_quartile_of_its_repetitions():
    """Load from other processes only adds time: a point hit in 3 of 5 repetitions keeps its unloaded time, and one
    lucky repetition does not set it."""
    from experiments.roofline import point_seconds

    assert point_seconds([0.049, 0.034, 0.066, 0.0336, 0.055]) == 0.034
    assert point_seconds([0.030, 0.020, 0.031]) == 0.020 and point_seconds([0.5]) == 0.5


def test_the_compute_ceiling_is_the_faster_of_blas_and_the_runtimes_own_product():
    """On a CPU where the packed kernel beats BLAS, a BLAS-only ceiling would put measured points above the roof."""
    from experiments.roofline import measure_ceilings

    c = measure_ceilings("cpu", quick=True, repeats=3)
    assert set(c["gemm_flops"]) == {"gemm", "gemm_runtime"} and min(c["gemm_flops"].values()) > 0
    assert c["peak_flops"] == pytest.approx(max(c["gemm_flops"].values()), rel=1e-6)
    assert c["gemm_source"] in ("BLAS", "the runtime's product") and c["bandwidth"] > 0


def test_the_default_grid_measures_prefill_at_every_batch_and_leaves_out_large_decode_points():
    """Prefill is half of a large batch's end-to-end time, so it is measured, not extrapolated from batches 1-2."""
    from experiments.roofline import Grid

    points = grid_points(Grid(), block=16, mask_share=0.4)
    assert sorted(b for op, b, _, _ in points if op == "prefill") == [1, 2, 4, 8, 16, 32]
    assert ("target", 32, 16, 256) not in points and ("target", 32, 8, 256) in points   # 512 and 256 tokens
    assert sorted(b for op, b, _, _ in points if op == "prefill" and b * 128 <= 256) == [1, 2]
    # A tree step's target pass (bonus + 8 nodes at block 4) is measured, not extrapolated from the block's sizes.
    tree = grid_points(Grid(), block=4, mask_share=0.4, tree_tokens=9)
    assert {q for op, b, q, _ in tree if op == "target" and b == 1} == {1, 2, 4, 8, 9}
    assert {q for op, b, q, _ in tree if op == "step_sequential" and b == 1} == {2, 4}


def test_the_bytes_model_counts_the_gguf_blocks_a_few_row_product_streams():
    """Where the packed CPU kernel reads the weights' GGUF blocks (up to ``block_rows`` rows), a pass streams 0.625
    bytes a layer weight and 1.0625 an lm_head weight, not 4: the floor moves with it; more rows stream fp32."""
    from dataclasses import replace

    fp32 = Shape(layers=30, tuned=12, block=4, hidden=576, intermediate=1536, vocab=49152, heads=9, kv_heads=3,
                 head_dim=64, rank=256, itemsize=4)
    blocks = replace(fp32, block_itemsize=0.625, block_lm_itemsize=1.0625, block_rows=12)
    weights = 30 * fp32.layer_params, 49152 * 576
    _, moved = work("target", blocks, 1, 9, 0)
    assert moved == pytest.approx(0.625 * weights[0] + 1.0625 * weights[1] + fp32.kv_bytes(30, 9))
    assert work("target", blocks, 4, 4, 64) == work("target", fp32, 4, 4, 64)          # 16 rows: fp32 packings
    assert work("draft", blocks, 1, 4, 0)[1] == pytest.approx(0.625 * 12 * fp32.layer_params)


@pytest.mark.real_model
def test_the_default_models_layers_and_lm_head_stream_as_their_gguf_blocks():
    from experiments.roofline import block_itemsizes
    from flexdraft.api import FlexDraft
    from kernels import cpu_matmul

    if not cpu_matmul.available():
        pytest.skip(f"packed CPU matmul unavailable: {cpu_matmul.why_unavailable()}")
    assert block_itemsizes(FlexDraft.load("default", drafter="untrained").model) == (0.625, 1.0625, 12)
