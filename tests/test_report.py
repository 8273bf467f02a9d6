"""The report generator makes its README and plots from a small fixture (a bench JSON and a flex store measured on a
tiny random model: the numbers mean nothing, the shapes are the real ones); the experiment commands fail in one line."""
import json
from pathlib import Path

import pytest

from experiments.report import markdown_table, write_report
from flexdraft.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
PLOTS = ["tokens_per_s.png", "speedup.png", "crossover.png", "predicted_vs_measured.png", "acceptance.png",
         "roofline.png"]


def test_report_from_fixture(tmp_path):
    readme = write_report(FIXTURES / "report_bench.json", FIXTURES / "report_store.json", [], tmp_path)
    text = readme.read_text()
    for heading in ("## Summary", "## Tokens/s and speedup per batch size", "## Flex: the crossover on this device",
                    "## Predicted vs measured", "## Acceptance", "## Roofline", "## How to reproduce"):
        assert heading in text
    for name in PLOTS:
        assert (tmp_path / name).stat().st_size > 5000 and f"({name})" in text
    assert "flexdraft bench (fixture)" in text and "flexdraft roofline --quick (fixture)" in text
    assert "| batch | ar | sequential | parallel | flex | hf |" in text


def test_report_with_only_a_store_and_a_kernel_json(tmp_path):
    kernels = tmp_path / "kernels.json"
    kernels.write_text(json.dumps({"benchmarks": [{"fullname": "tests/bench_decode.py::bench_step[ar]", "group": "g",
                                                   "stats": {"median": 1e-3, "min": 9e-4, "iqr": 1e-4,
                                                             "rounds": 5}}]}))
    readme = write_report(None, FIXTURES / "report_store.json", [kernels], tmp_path / "out")
    text = readme.read_text()
    assert "No bench JSON" in text and "## Kernel and decode-step benchmarks" in text and "bench_step[ar]" in text
    assert (tmp_path / "out" / "roofline.png").exists() and not (tmp_path / "out" / "speedup.png").exists()


def test_report_command(tmp_path, capsys):
    assert main(["report", "--bench", str(FIXTURES / "report_bench.json"), "--store",
                 str(FIXTURES / "report_store.json"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| batch |" in out and (tmp_path / "README.md").exists()


def test_markdown_table_formats_missing_cells():
    import pandas as pd

    df = pd.DataFrame({"a": [1.234, None], "b": ["x", "y"]}, index=pd.Index([1, 2], name="batch"))
    assert markdown_table(df, 2).splitlines() == ["| batch | a | b |", "|---|---|---|", "| 1 | 1.23 | x |",
                                                  "| 2 | - | y |"]


@pytest.mark.parametrize("argv,message", [
    (["report", "--device", "no-such-device"], "nothing to report"),
    (["bench", "--configs", "ar,nonsense"], "unknown nonsense"),
    (["bench", "--batch-sizes", "1,x"], "comma-separated integers"),
    (["roofline", "--batch-sizes", "0"], "positive integers"),
])
def test_experiment_commands_fail_in_one_line(capsys, argv, message):
    try:
        status = main(argv)
    except SystemExit as exit_info:   # argparse's own errors
        status = exit_info.code
    assert status != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_report_says_when_a_bench_run_was_cut_short(tmp_path):
    bench = json.loads((FIXTURES / "report_bench.json").read_text())
    bench.update(cells_planned=6, cells_done=4)
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    text = write_report(tmp_path / "bench.json", None, [], tmp_path / "out").read_text()
    assert "stopped after 4 of its 6" in text and "No flex store entry" in text


def test_predictions_take_the_prefill_rows_our_engine_computes():
    """Our prefill runs ragged prompts in passes of similar length (a CPU pads little; a GPU pads all, one pass), so
    the report predicts prefill from those rows, not from each batch's longest prompt (which overstated it ~2x)."""
    from experiments.bench import prompt_lengths

    ids = [[7] * n for n in (3, 50, 4, 60)]
    cpu = prompt_lengths(ids, 2, "cpu")
    assert cpu["prompt_tokens"] == 29.25 and cpu["padded_prompt_tokens"] == 55
    assert cpu["prefill_tokens"] == 29.25          # each prompt alone: a pass costs less than the padding
    assert prompt_lengths(ids, 2, "cuda")["prefill_tokens"] == 55   # one padded pass per batch
    assert prompt_lengths([[7] * 9] * 3, 3, "cpu")["prefill_tokens"] == 9


def test_a_target_met_by_the_median_alone_says_so(tmp_path):
    """The first GPU bench (3 repetitions on a noisy host) put flex at 2.48x `ar` at batch 16 with one repetition at
    0.65x: the report shows the per-repetition range and does not call that met."""
    from experiments.bench import summarise
    from experiments.report import target_rows

    def rep(config, repeat, rate):
        return {"config": config, "setting": "greedy", "dataset": "mtbench", "batch_size": 16, "repeat": repeat,
                "tokens_per_s": rate}

    ar, flex = [170.8, 1076.1, 365.9], [538.3, 703.9, 908.2]
    rows = {r["config"]: r for r in summarise([rep("ar", k, v) for k, v in enumerate(ar)]
                                              + [rep("flex", k, v) for k, v in enumerate(flex)])}
    assert rows["flex"]["speedup_range"] == pytest.approx([703.9 / 1076.1, 538.3 / 170.8])
    (row,) = target_rows(list(rows.values()))
    assert row["flex / ar"] == pytest.approx(908.2 / 365.9) and row["met"].startswith("median only")
    steady = [rep("ar", k, 400.0) for k in range(3)] + [rep("flex", k, 600.0 + k) for k in range(3)]
    assert target_rows(summarise(steady))[0]["met"] == "yes"

    (tmp_path / "FINDINGS.md").write_text("by hand")
    text = write_report(FIXTURES / "report_bench.json", None, [], tmp_path).read_text()
    assert "[FINDINGS.md](FINDINGS.md)" in text


def test_where_flex_ran_ars_loop_its_ratio_to_ar_is_noise_not_a_miss():
    from experiments.bench import summarise
    from experiments.report import flex_mode_steps, same_loop_ratios, target_rows

    def rep(config, batch, repeat, rate, mode_steps=None):
        return {"config": config, "setting": "greedy", "dataset": "mtbench", "batch_size": batch, "repeat": repeat,
                "tokens_per_s": rate, "mode_steps": mode_steps}

    measurements = []
    for batch, flex_modes in ((8, {"ar": 31}), (4, {"ar": 28, "sequential": 3}), (16, {"ar": 31})):
        for k in range(3):
            measurements += [rep("ar", batch, k, 150.0 + k), rep("sequential", batch, k, 90.0),
                             rep("flex", batch, k, 144.0 + k, flex_modes)]
    steps = flex_mode_steps(measurements)
    assert steps[("greedy", "mtbench", 4)] == {"ar": 84, "sequential": 9}
    rows = {r["batch"]: r for r in target_rows(summarise(measurements), steps)}
    assert rows[8]["flex / ar"] == pytest.approx(144 / 150, rel=0.01)
    assert rows[8]["met"].startswith("yes: flex ran `ar`'s loop")        # the same loop timed twice
    assert rows[4]["met"] == "no"                                         # it chose speculation and lost
    assert rows[16]["met"] == "no: flex ran `ar`'s loop"                  # 1.3x `ar` cannot come from `ar`
    assert target_rows(summarise(measurements))[0]["met"] == "no"         # without the steps, the ratio is judged
    # flex's ar-only repetitions against ar's: batches 8 and 16, 3 repetitions each
    assert same_loop_ratios(measurements) == pytest.approx(sorted([(144 + k) / (150 + k) for k in range(3)] * 2))

