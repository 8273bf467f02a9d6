"""The batch-1 replay of flex's controller (experiments/replay.py) walks the same steps as the engine."""
import pytest

import experiments.crossover
from experiments.crossover import FlexPolicy
from experiments.replay import compare, oracle_gains, replay
from flexdraft.api import FlexDraft
from flexdraft.drafter import Drafter
from helpers import StubTokenizer, random_prompts, tiny_target

MAX_NEW = 24
# A store whose batch-1 prediction sits at the margin: flex starts with ar and probes sequential steps.
AT_THE_MARGIN = {1: {"mode": "sequential", "verify_threshold": None, "speedup": 1.0, "tokens_per_step": 1.5}}


@pytest.fixture(scope="module")
def oracle():
    model, _ = tiny_target("llama", seed=5, max_position_embeddings=256)
    drafter = Drafter.initialise(model, num_tuned_layers=2, block_size=4, seed=0)
    fd = FlexDraft(model, StubTokenizer(), "tiny", drafter)
    prompts = random_prompts(model.config.vocab_size, [3, 9, 5, 12], seed=7)
    return fd, prompts, oracle_gains(fd, prompts, MAX_NEW, progress=False)


def test_oracle_rows_are_the_greedy_answers_and_replaying_sequential_takes_the_engines_steps(oracle):
    fd, prompts, rows = oracle
    ar = fd.generate(prompt_ids=prompts, mode="ar", max_new_tokens=MAX_NEW)
    assert [row["answer"] for row in rows] == [o["token_ids"] for o in ar.outputs]
    gains = [g for row in rows for g in row["gains"]]
    assert max(gains) > 1 and min(gains) >= 1   # copies of the looping answers are accepted: the test can fail
    sequential = fd.generate(prompt_ids=prompts, mode="sequential", max_new_tokens=MAX_NEW).stats
    assert replay(rows, lambda _b: "sequential", 2.0) == {
        "cost": 2.0 * sequential.mode_steps["sequential"], "speculative_steps": sequential.mode_steps["sequential"]}
    assert replay(rows, lambda _b: "ar", 2.0)["cost"] == sum(len(r["answer"]) - 1 for r in rows)


def test_replaying_the_controller_takes_the_steps_flex_takes(oracle, monkeypatch):
    fd, prompts, rows = oracle
    policy = FlexPolicy({1: ("ar", None)}, "test", AT_THE_MARGIN)
    monkeypatch.setattr(experiments.crossover, "flex_policy", lambda *_: policy)
    flex = fd.generate(prompt_ids=prompts, mode="flex", max_new_tokens=MAX_NEW).stats.mode_steps
    assert flex.get("ar", 0) > 0 and flex.get("sequential", 0) > 0
    assert replay(rows, policy.controller(), 1.0)["speculative_steps"] == flex["sequential"]
    result = compare(rows, policy, cost_ratio=1.0)   # speculation free: sequential is at least ar's speed
    assert result["sequential"] >= 1.0 and result["flex_vs_best"] <= 1.0 + 1e-12
    assert result["speculative_steps"] == flex["sequential"]
