"""Prompt lookup: the batched search equals the plain-Python reference, the engine reads the right history, and
copied drafts raise acceptance on repetitive text without changing the output (the exactness of sampling with
copied drafts is in tests/test_speculative.py)."""
import random

import pytest
import torch

from flexdraft.batch import Batch
from flexdraft.drafter import Drafter
from flexdraft.generate import generate_ar
from flexdraft.lookup import PromptLookup, lookup, lookup_reference
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import SpecConfig, generate_speculative
from helpers import random_prompts, tiny_target


@pytest.mark.parametrize("history,num,expected", [
    ([5, 6, 7, 5, 6], 3, [7, 5, 6]),            # what followed "5 6" the last time
    ([1, 2, 1, 2], 3, [1, 2, 1]),               # a match right before the suffix repeats with its period
    ([9, 9, 9], 4, [9, 9, 9, 9]),
    ([1, 2, 3, 4, 1, 2, 8, 2, 3, 4, 1, 2], 2, [8, 2]),   # the latest occurrence of the longest suffix (4 tokens)
    ([3, 1, 2, 7, 1, 2], 2, [7, 1]),
    ([1, 2, 3, 4, 5], 3, None),                 # nothing repeats
    ([4, 1, 2, 4], 3, None),                    # one repeated token is not enough
    ([], 2, None),
])
def test_reference_examples(history, num, expected):
    assert lookup_reference(history, num) == expected


def test_batched_lookup_matches_the_reference_on_ragged_rows():
    """Rows of random length at random offsets in a -1-padded history, small vocabularies so that suffixes repeat;
    rows without a match must come back -1 (the poison), not a stale proposal."""
    rng = random.Random(0)
    found_any = missing_any = False
    for _ in range(200):
        rows = [[rng.randrange(rng.choice([3, 5, 40])) for _ in range(rng.randrange(0, 23))] for _ in range(rng.randint(1, 7))]
        width = max(len(r) for r in rows) + rng.randrange(0, 5) + 1
        history = torch.full((len(rows), width), -1)
        end = torch.zeros(len(rows), dtype=torch.int64)
        for i, row in enumerate(rows):
            start = rng.randrange(0, width - len(row) + 1)
            history[i, start: start + len(row)] = torch.tensor(row, dtype=torch.int64)
            end[i] = start + len(row)
        num = rng.randint(1, 6)
        proposals, found = lookup(history, end, num)
        for i, row in enumerate(rows):
            expected = lookup_reference(row, num)
            assert bool(found[i]) == (expected is not None), (row, num)
            assert proposals[i].tolist() == (expected if expected is not None else [-1] * num), (row, num)
            found_any |= expected is not None
            missing_any |= expected is None
    assert found_any and missing_any


def test_prompt_lookup_reads_each_active_rows_prompt_and_output():
    prompts = [[1, 2, 3], [7, 8], [4, 4, 5, 6]]
    batch = Batch(3, 8, [[99], [99], [99]])
    batch.append(torch.tensor([[1, 2], [9, 99], [5, 6]]), torch.tensor([2, 2, 2]))   # row 1 stops and leaves
    batch.append(torch.tensor([[4], [6]]), torch.tensor([1, 1]))
    proposals, found = PromptLookup(prompts, "cpu").propose(batch, 3)
    # row 0: 1 2 3 1 2 4 ("2 4" never occurred before); row 2: 4 4 5 6 5 6 6 ("6 6" no): neither repeats
    assert found.tolist() == [False, False]
    batch.append(torch.tensor([[1, 2], [5, 6]]), torch.tensor([2, 2]))
    proposals, found = PromptLookup(prompts, "cpu").propose(batch, 3)
    assert found.tolist() == [True, True]
    assert proposals[0].tolist() == [4, 1, 2]   # 1 2 3 1 2 4 1 2: "1 2" was last followed by "4 1 2"
    assert proposals.tolist() == [lookup_reference([1, 2, 3, 1, 2, 4, 1, 2], 3),
                                  lookup_reference([4, 4, 5, 6, 5, 6, 6, 5, 6], 3)]


def test_a_copy_accepted_whole_doubles_the_rows_next_copy_and_anything_else_starts_it_over():
    """Two rows that repeat themselves: each row's copy grows 3 -> 6 -> 12 -> 16 (the longest) while it is accepted
    whole, falls back to 3 when it is not, or when the row did not copy; past a row's length its proposal is -1."""
    prompts = [[1, 2, 3] * 12, [4, 5] * 12]
    batch = Batch(2, 40, [[99], [99]])
    batch.append(torch.tensor([[1], [4]]), torch.tensor([1, 1]))
    copies = PromptLookup(prompts, "cpu", copy_len=3, longest=16)
    everyone, nobody = torch.tensor([True, True]), torch.tensor([False, False])
    for first_row, second_row in [(3, 3), (6, 6), (12, 12), (16, 3)]:
        proposals, found = copies.propose(batch, 3, grow=True)
        assert found.tolist() == [True, True]
        lengths = (proposals >= 0).sum(dim=1).tolist()
        assert lengths == [first_row, second_row]
        assert proposals[0, :first_row].tolist() == lookup_reference(prompts[0] + [1], first_row)
        assert proposals[1, :second_row].tolist() == lookup_reference(prompts[1] + [4], second_row)
        verified = torch.tensor(lengths)
        copies.heard(batch, everyone, verified, verified - torch.tensor([0, 0 if second_row < 12 else 1]))
    assert copies.run.tolist() == [16, 6]
    copies.heard(batch, torch.tensor([False, True]), torch.tensor([16, 6]), torch.tensor([16, 6]))
    assert copies.run.tolist() == [3, 12]   # row 0 drafted with the drafter: its run starts over
    proposals, _ = copies.propose(batch, 5, grow=False)
    assert proposals.shape == (2, 5) and bool((proposals >= 0).all())   # without growth: the length asked for
    copies.heard(batch, nobody, torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert copies.run.tolist() == [3, 3]


def test_copied_drafts_raise_acceptance_on_repetitive_output_and_keep_it_identical():
    """A tiny random target falls into loops; the untrained drafter barely drafts them, copies do."""
    model = tiny_target("qwen3", seed=5)[0]
    prompts = random_prompts(model.config.vocab_size, [3 + (5 * i) % 11 for i in range(8)], seed=8)
    expected, _ = generate_ar(model, prompts, 40, SamplingParams(), [[-1]] * 8, torch.arange(8))
    drafter = Drafter.initialise(model, num_tuned_layers=2, block_size=6, seed=1)
    accepted = {}
    for lookup_on in (False, True):
        got, stats = generate_speculative(model, drafter, prompts, 40, SamplingParams(), [[-1]] * 8, torch.arange(8),
                                          "parallel", SpecConfig(0.0, lookup=lookup_on))
        assert got.results() == expected.results()
        assert (stats.lookup_drafts > 0) == lookup_on
        accepted[lookup_on] = stats.mean_accepted
    assert accepted[True] > accepted[False] + 0.2, accepted
