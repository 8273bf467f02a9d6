"""``flexdraft evaluate``: every configuration measured on the same prompts, lossless against ar, and its report."""
import itertools
import json

import pytest

from flexdraft.errors import FlexDraftError
from flexdraft.evaluate import CONFIGS, QUICK_CONFIGS, evaluate, markdown, position_acceptance, section_training


def test_position_acceptance_counts_steps_that_went_past_draft_k():
    # histogram[n] = steps that gained n tokens (bonus included): 3 steps gained 1, 2 gained 2, 1 gained 4
    assert position_acceptance([0, 3, 2, 0, 1]) == [3 / 6, 1 / 6, 1 / 6]


@pytest.mark.real_model
def test_evaluate_runs_every_configuration_losslessly():
    from flexdraft.api import FlexDraft
    from flexdraft.assets import mtbench_prompts

    fd = FlexDraft.load("default", "float32", "default")
    results = evaluate(fd, {"MT-bench": mtbench_prompts()[:1]}, max_new_tokens=12, log=lambda m: None)
    rows = results["MT-bench"]
    assert set(rows) == set(CONFIGS)
    assert all(r["outputs_differing_from_ar"] == 0 and r["new_tokens"] == rows["ar"]["new_tokens"] for r in rows.values())
    assert rows["ar"]["mean_accepted"] == 1.0 and rows["parallel"]["mean_accepted"] >= 1.0
    meta = {"drafter": "default", "max_new_tokens": 12,
            "provenance": {"device_name": "cpu", "threads": 1, "versions": {"torch": "x"}, "git_commit": "abc",
                           "command": "flexdraft evaluate"}}
    text = markdown(results, meta)
    assert "| parallel, no lookup, no calibration |" in text and "| accepted |" in text

    quick = evaluate(fd, {"MT-bench": mtbench_prompts()[:1]}, max_new_tokens=12, log=lambda m: None,
                     configs=QUICK_CONFIGS)["MT-bench"]
    assert set(quick) == {"ar", "sequential", "parallel"}
    for key, config in itertools.product(("mean_accepted", "new_tokens", "accept_histogram",
                                          "outputs_differing_from_ar"), ("sequential", "parallel")):
        assert quick[config][key] == rows[config][key]   # the same figures as in the whole run
    assert "| parallel, no lookup |" not in markdown({"MT-bench": quick}, meta)


class ScriptedModels:
    """Stands in for ``FlexDraft`` in ``evaluate``: each configuration's step count follows from the prompt and its
    verify threshold; ``fail_after`` generate calls raise KeyboardInterrupt (an interrupted run)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def encode(self, prompts):
        return [[len(p), i] for i, p in enumerate(prompts)]

    def generate(self, prompt_ids, max_new_tokens, mode="parallel", **kwargs):
        from types import SimpleNamespace

        from flexdraft.batch import Stats

        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((prompt_ids[0][1], mode, tuple(sorted(kwargs.items()))))
        steps = max_new_tokens if mode == "ar" else 1 + (prompt_ids[0][0] + len(kwargs)) % max_new_tokens
        stats = Stats(new_tokens=max_new_tokens, seconds=0.01 * steps, target_forwards=steps, row_forwards=steps,
                      accept_histogram=[0, steps], timings={"target_forward": 0.01 * steps}, mode_steps={mode: steps})
        return SimpleNamespace(stats=stats, outputs=[{"token_ids": list(range(max_new_tokens))}])


@pytest.mark.real_model
def test_the_command_runs_on_the_default_device_and_names_it(tmp_path):
    """``--device`` left at auto: the run's provenance names the device it resolved to (it once passed "auto" on
    and ended in a traceback)."""
    from experiments.provenance import current_slug
    from flexdraft.cli import main

    out = tmp_path / "acceptance"
    assert main(["evaluate", "--mtbench", "1", "--humaneval", "0", "--max-new-tokens", "3", "--quick",
                 "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert meta["provenance"]["device"] == current_slug("cpu")


def test_an_interrupted_evaluation_goes_on_from_the_next_prompt(tmp_path):
    datasets = {"MT-bench": ["a", "bbb", "cc"], "HumanEval": ["dddd", "e"]}
    key, progress, said = {"git_commit": "abc", "device": "cpu"}, tmp_path / "acceptance.progress.json", []
    whole = evaluate(ScriptedModels(), datasets, 8, log=said.append, configs=QUICK_CONFIGS)
    per_prompt = len(QUICK_CONFIGS)
    interrupted = ScriptedModels(fail_after=1 + 4 * per_prompt + 1)   # warm-up, 4 whole prompts, 1 configuration
    with pytest.raises(KeyboardInterrupt):
        evaluate(interrupted, datasets, 8, log=said.append, configs=QUICK_CONFIGS, progress=progress, run_key=key)
    assert json.loads(progress.read_text())["datasets"]["HumanEval"]["prompts_done"] == 1
    resumed = ScriptedModels()
    assert evaluate(resumed, datasets, 8, log=said.append, configs=QUICK_CONFIGS, progress=progress,
                    run_key=key) == whole
    assert "continuing from" in said[-1] and "HumanEval 1 prompts" in said[-1]
    # Only the last prompt ran again (after its dataset's warm-up), every configuration of it.
    assert [call[0] for call in resumed.calls] == [0] + [1] * per_prompt

    # Another commit's totals are not mixed in; neither is an unreadable file's.
    again = ScriptedModels()
    evaluate(again, datasets, 8, log=said.append, configs=QUICK_CONFIGS, progress=progress,
             run_key={**key, "git_commit": "def"})
    assert "another git_commit: starting over" in said[-1] and len(again.calls) == 2 + 5 * per_prompt
    progress.write_text('{"run": ')
    evaluate(ScriptedModels(), datasets, 8, log=said.append, configs=QUICK_CONFIGS, progress=progress, run_key=key)
    assert "unreadable: starting over" in said[-1]


def test_training_section_plots_the_held_out_curve(tmp_path):
    history = [{"step": s, "loss": 5.0 - s / 100, "time": 1000.0 + 30 * s} for s in range(1, 101)]
    history[49].update(tau=1.2, tau_raw=1.1)
    history[99].update(tau=1.3, tau_raw=1.15, tau_walk=1.22, tau_train=1.41)   # older runs recorded neither
    for record in history[60:]:
        record["time"] += 86_400.0              # stopped after step 60 and resumed a day later
    state = {"step": 100, "history": history, "drafter_config": {"num_tuned_layers": 8, "block_size": 16,
                                                                 "calibration_rank": 256},
             "config": {"sequences_per_step": 4, "blocks_per_sequence": 16, "lr": 5e-4, "position_decay": 7.0,
                        "seed": 0, "bf16": True}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    lines = section_training(tmp_path / "state.json", tmp_path / "acceptance")
    assert (tmp_path / "acceptance-training.png").stat().st_size > 1000
    assert "100 steps in this run (0.8 h of training)" in lines[2]      # 98 steps of 30 s; the pause left out
    assert "| 100 | 1.300 | 1.150 | 1.220 | 1.410 | 4.000 |" in lines and "| 50 | 1.200 | 1.100 | - | - | 4.500 |" in lines
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(FlexDraftError, match="cannot read the training state"):
        section_training(tmp_path / "state.json", tmp_path / "acceptance")
