"""FlexDraft decoding is lossless: greedy equals autoregressive decoding in every mode and batch size, and sampling
reproduces the target distribution exactly (checked against enumeration on a tiny model)."""
import itertools
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexdraft.api import merge_stats
from flexdraft.batch import Stats
from flexdraft.drafter import Drafter
from flexdraft.generate import generate_ar
from flexdraft.sampling import SamplingParams, probabilities
from flexdraft.speculative import Drafts, SpecConfig, generate_speculative, verify_len
from helpers import random_prompts, tiny_target
from kernels.verify import verify_sampling_reference

MODES = ["parallel", "sequential", "flex", "flex-ar-first"]

# Synthetic flex policies: a new mode (ar included) and threshold every step, whatever the batch size. The first
# choice is made before prefill: "flex-ar-first" prefills without drafts, and its first speculative step drafts.
FLEX_CYCLES = {
    "flex": [("parallel", 0.0), ("parallel", 0.0), ("ar", None), ("sequential", 0.3), ("ar", None), ("ar", None),
             ("parallel", None), ("sequential", 0.0)],
    "flex-ar-first": [("ar", None), ("parallel", 0.0), ("ar", None), ("sequential", 0.3), ("parallel", None),
                      ("ar", None), ("sequential", 0.0)],
}


class SwitchingPolicy:
    def __init__(self, cycle):
        self.cycle, self.calls = cycle, 0

    def __call__(self, batch_size):
        self.calls += 1
        return self.cycle[(self.calls - 1) % len(self.cycle)]


def step_mode(mode):
    """What generate_speculative takes for a test's mode name (flex: a fresh switching policy)."""
    return SwitchingPolicy(FLEX_CYCLES[mode]) if mode in FLEX_CYCLES else mode


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", seed=5)[0]


def stops_mid_batch(model, prompts, max_new):
    """A stop token that the first sequence emits mid-way, so the batch shrinks while others go on."""
    free, _ = generate_ar(model, prompts, max_new, SamplingParams(), [[-1]] * len(prompts), torch.arange(len(prompts)))
    return free.results()[0][0][max_new // 3]


def some_tokens(vocab_size: int, count: int, seed: int) -> list[int]:
    """A draft vocabulary: ``count`` random token ids of the target's."""
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:count].tolist()


# How drafts are made: copies as long as the drafter's 5 drafts; copies of the default length (10) beside them, at
# every batch size (by default only where one row is left); the drafter alone; sequential and parallel steps verifying
# trees of the drafter's candidates and long copies.
DRAFTING = {"lookup": dict(lookup=True, lookup_len=0), "long-copies": dict(lookup=True, long_copy_batch=8),
            "drafter-alone": dict(lookup=False),
            "trees": dict(lookup=True, long_copy_batch=8, tree_nodes=7, tree_batch=8, parallel_trees=True)}


@pytest.mark.parametrize("drafting", DRAFTING)
@pytest.mark.parametrize("draft_vocab", [False, True], ids=["whole-vocab", "draft-vocab"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size", range(1, 9))
def test_greedy_is_identical_to_autoregressive(target, mode, batch_size, draft_vocab, drafting):
    vocab = some_tokens(target.config.vocab_size, target.config.vocab_size // 3, batch_size) if draft_vocab else None
    check_greedy_is_identical_to_autoregressive(target, mode, batch_size, vocab, **DRAFTING[drafting])


def check_greedy_is_identical_to_autoregressive(target, mode, batch_size, vocab=None, **drafting):
    """Ragged prompts, a stop that the first sequence emits mid-way, every draft verified (threshold 0); with prompt
    lookup, the target's loops make some drafts copies (``drafting``: ``SpecConfig``'s lookup fields)."""
    prompts = random_prompts(target.config.vocab_size, [3 + (5 * i) % 11 for i in range(batch_size)], seed=batch_size)
    stop = stops_mid_batch(target, prompts, 18)
    stop_ids = [[stop, 96]] * batch_size
    drafter = Drafter.initialise(target, num_tuned_layers=2, block_size=6, seed=batch_size, draft_vocab=vocab)
    assert drafter.mask_embedding.device == target.device
    expected, _ = generate_ar(target, prompts, 18, SamplingParams(), stop_ids, torch.arange(batch_size))
    got, stats = generate_speculative(target, drafter, prompts, 18, SamplingParams(), stop_ids,
                                      torch.arange(batch_size), step_mode(mode),
                                      SpecConfig(verify_threshold=0.0, **drafting))
    assert got.results() == expected.results()
    assert expected.results()[1][0] == "stop"
    assert drafting.get("lookup", True) or stats.lookup_drafts == 0
    assert stats.new_tokens == sum(len(t) for t in expected.results()[0])


def test_parallel_and_sequential_draft_the_same_tokens(target):
    """Group a of a parallel step sees exactly what the sequential draft pass sees after accepting a drafts."""
    prompts = random_prompts(target.config.vocab_size, [4, 9, 2], seed=7)
    drafter = Drafter.initialise(target, num_tuned_layers=3, block_size=5, seed=1)
    runs = [generate_speculative(target, drafter, prompts, 24, SamplingParams(), [[-1]] * 3, torch.arange(3), m,
                                 SpecConfig(verify_threshold=0.0, tree_nodes=0)) for m in ("parallel", "sequential")]
    assert runs[0][1].accept_histogram == runs[1][1].accept_histogram
    assert runs[0][1].mask_tokens > runs[1][1].mask_tokens  # parallel pays for v + 1 groups


def test_parallel_and_sequential_tree_steps_draft_the_same_tokens(target):
    """The mask group of a parallel tree step anchored at the last accepted node sees exactly what the sequential draft
    pass sees after a tree step accepted that path: the same drafts, so the same acceptance."""
    prompts = random_prompts(target.config.vocab_size, [4, 9, 2], seed=7)
    drafter = Drafter.initialise(target, num_tuned_layers=3, block_size=5, seed=1)
    spec = SpecConfig(verify_threshold=0.0, tree_nodes=6, tree_batch=3, parallel_trees=True, lookup=False)
    runs = [generate_speculative(target, drafter, prompts, 24, SamplingParams(), [[-1]] * 3, torch.arange(3), m,
                                 spec) for m in ("parallel", "sequential")]
    chain = generate_speculative(target, drafter, prompts, 24, SamplingParams(), [[-1]] * 3, torch.arange(3),
                                 "sequential", replace(spec, tree_nodes=0))[1]
    assert runs[0][1].accept_histogram == runs[1][1].accept_histogram != chain.accept_histogram
    assert runs[0][0].results() == runs[1][0].results()


def test_a_drafter_that_knows_the_answer_is_accepted(target):
    """Drafts equal to the target's own greedy tokens must all be accepted: the acceptance path really works."""
    from kernels.verify import verify_greedy_reference

    drafts = torch.tensor([[4, 5, 6, 7]])
    out, accept_len, new_len = verify_greedy_reference(drafts, torch.tensor([4]), torch.tensor([[4, 5, 6, 7, 8]]),
                                                      torch.tensor([10]))
    assert accept_len.tolist() == [4] and out.tolist() == [[4, 5, 6, 7, 8]] and new_len.tolist() == [15]
    out, accept_len, _ = verify_greedy_reference(drafts, torch.tensor([2]), torch.tensor([[4, 5, 6, 7, 8]]),
                                                 torch.tensor([10]))
    assert accept_len.tolist() == [2] and out.tolist() == [[4, 5, 6, -1, -1]]


def test_one_hot_draft_equal_to_one_hot_target_is_always_accepted():
    V, n = 7, 3
    tokens = torch.tensor([[2, 5, 1]] * 50)
    q = torch.nn.functional.one_hot(tokens, V).float()
    p = torch.cat([q, torch.full((50, 1, V), 1.0 / V)], dim=1)
    uniforms = torch.rand(50, n)
    out, accept_len, _ = verify_sampling_reference(tokens, torch.full((50,), n), q, p, uniforms,
                                                   torch.empty(50, V).exponential_(), torch.zeros(50, dtype=torch.long))
    assert (accept_len == n).all() and (out[:, :n] == tokens).all()


@pytest.mark.parametrize("strategy,expected", [("cumulative_product", [2, 1, 3]), ("min_confidence", [3, 1, 3])])
def test_verify_len_follows_confidence(strategy, expected):
    conf = torch.tensor([[0.5, 0.3, 0.2], [0.001, 0.9, 0.9], [0.9, 0.9, 0.9]])
    assert verify_len(conf, SpecConfig(0.1, strategy)).tolist() == expected


@pytest.mark.parametrize("strategy", ["cumulative_product", "min_confidence"])
@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_verify_len_never_verifies_an_empty_slot(strategy, threshold):
    """A drafter's row beside a longer copy is padded with empty slots (confidence 0), even at threshold 0."""
    conf = torch.tensor([[0.9, 0.8, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.95, 0.0, 0.0, 0.0]])
    assert verify_len(conf, SpecConfig(threshold, strategy)).tolist() == [2, 4, 1]


def test_widened_drafts_pad_empty_slots_and_replaced_rows_take_longer_copies():
    probs = torch.rand(2, 3, 7).softmax(-1)
    drafts = Drafts(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[0.5, 0.25, 0.125], [0.75, 0.5, 0.25]]), probs)
    copied = drafts.replaced(torch.tensor([False, True]), torch.tensor([[0, 0, 0, 0, 0], [6, 5, 4, 3, 2]]))
    assert copied.tokens.tolist() == [[1, 2, 3, 0, 0], [6, 5, 4, 3, 2]]
    assert copied.confidence.tolist() == [[0.5, 0.25, 0.125, 0.0, 0.0], [1.0] * 5]
    assert torch.equal(copied.probs[0, :3], probs[0]) and not copied.probs[0, 3:].any()
    assert torch.equal(copied.probs[1], torch.nn.functional.one_hot(torch.tensor([6, 5, 4, 3, 2]), 7).float())
    assert drafts.widened(2) is drafts and drafts.replaced(torch.tensor([False, False]), copied.tokens) is drafts


def test_long_copies_gain_more_than_a_block_per_step_on_repetitive_output():
    """The tiny random target falls into loops: at batch 1, copies of up to 12 tokens accept runs the drafter's block
    of 3 drafts cannot, and the output stays the target's own. In a batch of 2, copies stay within the block. (Chains
    only: a tree step would accept more than the parallel step it is compared with.)"""
    model = tiny_target("qwen3", seed=5)[0]
    prompts = random_prompts(model.config.vocab_size, [3 + (5 * i) % 11 for i in range(6)], seed=8)
    expected, _ = generate_ar(model, prompts, 40, SamplingParams(), [[-1]] * 6, torch.arange(6))
    drafter = Drafter.initialise(model, num_tuned_layers=2, block_size=4, seed=1)

    def run(mode, lookup_len, batch_size):
        total, trace = Stats(), []
        for first in range(0, len(prompts), batch_size):
            rows = range(first, first + batch_size)
            spec = SpecConfig(0.0, lookup_len=lookup_len, longest_copy=0, tree_nodes=0)   # no growth: see below
            got, stats = generate_speculative(model, drafter, prompts[first: first + batch_size], 40, SamplingParams(),
                                              [[-1]] * batch_size, torch.arange(batch_size), mode, spec, trace=trace)
            assert got.results()[0] == [expected.results()[0][i] for i in rows]
            merge_stats(total, stats)
        return total, trace

    accepted = {}
    for mode, lookup_len in itertools.product(("parallel", "sequential"), (0, 12)):
        stats, _ = run(mode, lookup_len, 1)
        assert len(stats.accept_histogram) == max(4, lookup_len + 1) + 1
        assert (sum(stats.accept_histogram[5:]) > 0) == (lookup_len > 0)   # steps that gained more than 4 tokens
        accepted[mode, lookup_len] = stats.mean_accepted
        _, trace = run(mode, lookup_len, 2)
        verified = [int(step["num_drafts"].max()) for step in trace if len(step["num_drafts"]) == 2]
        assert max(verified) == 3     # two rows: a copy drafts at most the drafter's 3 (one row left: up to 12)
    assert accepted["parallel", 12] == accepted["sequential", 12] > accepted["parallel", 0] + 0.15, accepted



@pytest.mark.parametrize("mode", MODES)
def test_copies_accepted_whole_grow_and_keep_the_output(mode):
    """One row at a time in the tiny target's loops: copies that start at 4 tokens and double while accepted whole
    gain steps of more than 5 tokens (a copy that never grows cannot), fewer steps in all, the same output."""
    model = tiny_target("qwen3", seed=5)[0]
    prompts = random_prompts(model.config.vocab_size, [3 + (5 * i) % 11 for i in range(6)], seed=8)
    expected, _ = generate_ar(model, prompts, 60, SamplingParams(), [[-1]] * 6, torch.arange(6))
    drafter = Drafter.initialise(model, num_tuned_layers=2, block_size=4, seed=1)
    totals = {}
    for longest in (0, 32):
        total = Stats()
        for i, prompt in enumerate(prompts):
            got, stats = generate_speculative(model, drafter, [prompt], 60, SamplingParams(), [[-1]],
                                              torch.arange(1), step_mode(mode),
                                              SpecConfig(0.0, lookup_len=4, longest_copy=longest))
            assert got.results()[0] == [expected.results()[0][i]], (longest, i)
            merge_stats(total, stats)
        totals[longest] = total
    assert sum(totals[0].accept_histogram[6:]) == 0 < sum(totals[32].accept_histogram[6:])
    assert totals[32].target_forwards < totals[0].target_forwards

# ---- sampling: the exact target distribution ------------------------------------------------------------------
VOCAB, CONTINUATION = 6, 3
PARAMS = SamplingParams(temperature=1.0, top_k=5, top_p=0.95)


@pytest.fixture(scope="module")
def small_vocab():
    model, hf = tiny_target("llama", seed=11, vocab_size=VOCAB)
    return model


def exact_distribution(model, prompt, params, length=CONTINUATION):
    """p(x1 .. x_length | prompt) by enumeration of every continuation."""
    from flexdraft.generate import pad_prompts

    heads = list(itertools.product(range(VOCAB), repeat=length - 1))
    tokens, positions, _ = pad_prompts([prompt + list(c) for c in heads], "cpu")
    with torch.no_grad():
        probs = probabilities(model.logits(model(tokens, positions, model.new_cache(len(heads), tokens.shape[1]))[0]),
                              params).double()
    n = len(prompt)
    exact = torch.zeros((VOCAB,) * length, dtype=torch.float64)
    for i, c in enumerate(heads):
        pr = math.prod(probs[i, n - 1 + j, token] for j, token in enumerate(c))
        exact[c] = pr * probs[i, n + length - 2]
    return exact.flatten()


def empirical(batch, length=CONTINUATION):
    tokens, _ = batch.results()
    idx = torch.tensor([sum(t[j] * VOCAB ** (length - 1 - j) for j in range(length)) for t in tokens])
    return torch.bincount(idx, minlength=VOCAB ** length).double() / len(tokens)


def tv(a, b):
    return 0.5 * float((a - b).abs().sum())


def expected_tv_bound(p, n):
    """An upper bound on E[TV] for n samples: 0.5 * sum sqrt(p (1 - p) / n)."""
    return 0.5 * float((p * (1 - p) / n).sqrt().sum())


@pytest.mark.parametrize("mode", ["ar"] + MODES + ["parallel-draft-vocab", "sequential-draft-vocab", "parallel-lookup",
                                  "sequential-lookup", "flex-lookup", "parallel-long-lookup", "sequential-long-lookup",
                                  "sequential-tree", "flex-tree", "sequential-lookup-tree", "parallel-tree"])
def test_sampling_matches_exact_target_distribution(small_vocab, mode):
    """The "-draft-vocab" cases draft from 4 of the 6 tokens: q is zero on the other two, so only the residual
    max(p - q, 0) can produce them, and the output must still follow p exactly. In the "-lookup" cases the prompt
    repeats itself, so drafts are copies (q one-hot) from the first step on; elsewhere the drafter drafts alone.
    "-long-lookup" drafts 1 token from the drafter and copies 2 (over 4 new tokens, so that a step can verify 2):
    rows that copy and rows that do not share a step. "-tree" verifies trees of the drafter's 4 likeliest paths in
    sequential and parallel steps (candidates, not samples of q)."""
    tree = mode.endswith("-tree")
    mode = mode.removesuffix("-tree")
    lookup, long_copies = mode.endswith("-lookup"), mode.endswith("-long-lookup")
    # Prompts that repeat: with [3, 4, 2, 3, 3] most first steps copy 2 tokens, and 30% accept both.
    model, prompt = small_vocab, ([3, 4, 2, 3, 3] if long_copies else [1, 4, 2, 1, 4] if lookup else [1, 4, 2, 3])
    length = CONTINUATION + long_copies
    exact = exact_distribution(model, prompt, PARAMS, length)
    vocab = [0, 2, 3, 5] if mode.endswith("-draft-vocab") else None
    mode = mode.removesuffix("-draft-vocab").removesuffix("-long-lookup").removesuffix("-lookup")
    drafter = Drafter.initialise(model, num_tuned_layers=2, block_size=2 if long_copies else 4, seed=3,
                                 draft_vocab=vocab)
    distances = []
    for n, seed0 in [(400, 0), (6400, 10_000)]:
        seeds = torch.arange(seed0, seed0 + n)
        if mode == "ar":
            batch, _ = generate_ar(model, [prompt] * n, length, PARAMS, [[-1]] * n, seeds)
        else:
            batch, stats = generate_speculative(model, drafter, [prompt] * n, length, PARAMS, [[-1]] * n,
                                                seeds, step_mode(mode),
                                                SpecConfig(verify_threshold=0.0, lookup=lookup,
                                                           lookup_len=2 * long_copies, long_copy_batch=n,
                                                           tree_nodes=4 * tree, tree_batch=n, parallel_trees=tree))
            assert stats.mean_accepted > 1.0  # drafts were accepted, so the accept/reject paths both ran
            assert not long_copies or stats.accept_histogram[3] > 0   # a copy of 2 accepted whole, bonus after it
            assert (stats.lookup_drafts > 0) == lookup
        distances.append(tv(empirical(batch, length), exact))
        assert distances[-1] < 1.5 * expected_tv_bound(exact, n), (n, distances)
    assert distances[1] < distances[0]
    # The test has power: a sampler this far off (temperature 0.6 instead of 1) lands beyond the threshold plus noise.
    other = exact_distribution(model, prompt, SamplingParams(0.6, PARAMS.top_k, PARAMS.top_p), length)
    assert tv(other, exact) > 2.5 * expected_tv_bound(exact, 6400)


# ---- property-based: random tiny configs, blocks, thresholds and batches ---------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["llama", "qwen2", "qwen3"]), layers=st.integers(2, 4), tuned=st.integers(1, 4),
       block=st.integers(2, 7), threshold=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
       strategy=st.sampled_from(["cumulative_product", "min_confidence"]), mode=st.sampled_from(MODES),
       lengths=st.lists(st.integers(1, 10), min_size=1, max_size=6), max_new=st.integers(1, 20),
       calibration=st.booleans(), draft_vocab=st.sampled_from([0, 1, 7, 40]), lookup_len=st.sampled_from([0, 4, 9]),
       tree_nodes=st.sampled_from([0, 1, 3, 12]), seed=st.integers(0, 1000))
def test_property_greedy_lossless(family, layers, tuned, block, threshold, strategy, mode, lengths, max_new,
                                  calibration, draft_vocab, lookup_len, tree_nodes, seed):
    model, _ = tiny_target(family, seed=seed, num_hidden_layers=layers)
    vocab = some_tokens(model.config.vocab_size, draft_vocab, seed) if draft_vocab else None
    drafter = Drafter.initialise(model, num_tuned_layers=min(tuned, layers), block_size=block, seed=seed,
                                 draft_vocab=vocab)
    prompts = random_prompts(model.config.vocab_size, lengths, seed=seed)
    stops = [[seed % model.config.vocab_size]] * len(prompts)
    expected, _ = generate_ar(model, prompts, max_new, SamplingParams(), stops, torch.arange(len(prompts)))
    got, _ = generate_speculative(model, drafter, prompts, max_new, SamplingParams(), stops,
                                  torch.arange(len(prompts)), step_mode(mode),
                                  SpecConfig(threshold, strategy, calibration, lookup_len=lookup_len,
                                             tree_nodes=tree_nodes, tree_batch=6))
    assert got.results() == expected.results()
