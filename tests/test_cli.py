"""The CLI contract: bad input is one line on stderr and a non-zero exit; --json has the documented shape."""
import json
import subprocess
import sys

import pytest
import torch

from flexdraft.cli import main


NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without a CUDA GPU")


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", ""], "empty prompt"),
    (["generate", "--prompt", "   "], "empty prompt"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-p", "1.01"], "--top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "--prompt", "hi", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["generate", "--prompt", "hi", "--lookup-len", "-1"], "--lookup-len must be in [0, 63]"),
    (["generate", "--prompt", "hi", "--lookup-len", "64"], "--lookup-len must be in [0, 63]"),
    (["generate", "--prompt", "hi", "--longest-copy", "64"], "--longest-copy must be in [0, 63]"),
    (["generate", "--prompt", "hi", "--tree-nodes", "-2"], "--tree-nodes must be in [0, 63]"),
    (["generate", "--prompt", "hi", "--tree-nodes", "64"], "--tree-nodes must be in [0, 63]"),
    (["generate", "--prompt", "hi", "--model", "/no/such/dir"], "does not exist"),
    (["generate", "--prompts-file", "/no/such/file.jsonl"], "cannot read prompts file"),
    (["evaluate", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    *(pytest.param(argv, "this torch sees no CUDA GPU", marks=NEEDS_NO_GPU) for argv in
      (["train", "--out", "unused", "--device", "cuda"], ["data", "--device", "cuda:0"])),
])
def test_bad_input_is_one_line_and_nonzero(capsys, argv, message):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_device_auto_picks_a_cuda_gpu_where_torch_sees_one(monkeypatch):
    from flexdraft.api import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"


def test_train_flags_follow_the_training_settings():
    """Every TrainConfig field is a flag of its own type; bf16 defaults to None (decided by the device)."""
    from dataclasses import fields

    from flexdraft.cli import build_parser
    from flexdraft.train import TrainConfig

    args = build_parser().parse_args(["train", "--out", "x", "--bf16", "false", "--num-tuned-layers", "16",
                                      "--lr", "3e-3", "--steps", "7"])
    assert (args.bf16, args.num_tuned_layers, args.lr, args.steps, args.device) == (False, 16, 3e-3, 7, "auto")
    defaults = build_parser().parse_args(["train", "--out", "x"])
    assert {f.name: getattr(defaults, f.name) for f in fields(TrainConfig)} == TrainConfig().__dict__
    assert defaults.bf16 is None


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "hi", "--mode", "nonsense"])
    assert exit_info.value.code != 0
    assert capsys.readouterr().err.count("\n") == 1


def test_prompts_file_accepts_prompt_and_mtbench_turns(tmp_path):
    from flexdraft.cli import read_prompts_file

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"turns": ["b", "c"], "question_id": 1}\n')
    assert read_prompts_file(str(f)) == ["a", "b"]
    f.write_text('{"text": "a"}\n')
    with pytest.raises(Exception, match="p.jsonl:1"):
        read_prompts_file(str(f))


def test_corrupt_model_directory_from_a_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"')
    proc = subprocess.run([sys.executable, "-m", "flexdraft", "generate", "--prompt", "hi", "--model", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "corrupt config.json" in proc.stderr


@pytest.mark.real_model
def test_json_output_contract_on_default_model(capsys):
    assert main(["generate", "--prompt", "Name a color.", "--prompt", "Count to three.", "--max-new-tokens", "8",
                 "--batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"mode", "model", "outputs", "stats"} and result["mode"] == "ar"
    for out in result["outputs"]:
        assert set(out) >= {"prompt", "prompt_token_ids", "token_ids", "text", "finish_reason"}
        assert 1 <= len(out["token_ids"]) <= 8
        assert (out["finish_reason"] == "stop") == (len(out["token_ids"]) < 8 or out["token_ids"][-1] == 2)
    stats = result["stats"]
    assert stats["new_tokens"] == sum(len(o["token_ids"]) for o in result["outputs"])
    assert stats["mean_accepted"] == 1.0 and stats["seconds"] > 0 and stats["tokens_per_s"] > 0


@pytest.mark.real_model
def test_no_lookup_drafts_with_the_drafter_alone_and_changes_no_token(capsys):
    prompt = ["--prompt", "Repeat exactly, five times: red fox, blue fox, red fox, blue fox."]
    runs = []
    for extra in ([], ["--no-lookup"]):
        assert main(["generate", *prompt, "--mode", "parallel", "--max-new-tokens", "24", "--json", *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["outputs"][0]["token_ids"] == runs[1]["outputs"][0]["token_ids"]
    assert runs[0]["stats"]["lookup_drafts"] > 0 and runs[1]["stats"]["lookup_drafts"] == 0


@pytest.mark.real_model
def test_bf16_speculative_on_a_cpu_says_it_is_not_lossless(capsys):
    """One stderr line for bf16 speculative decoding on a CPU, none for fp32 (the lossless default)."""
    for dtype, warned in (("bfloat16", True), ("float32", False)):
        assert main(["generate", "--prompt", "Name a color.", "--mode", "parallel", "--max-new-tokens", "4",
                     "--dtype", dtype, "--device", "cpu", "--json"]) == 0
        assert ("not batch invariant" in capsys.readouterr().err) == warned


@pytest.mark.real_model
def test_too_long_prompt_and_missing_drafter_are_clear(capsys):
    assert main(["generate", "--prompt", "word " * 9000, "--max-new-tokens", "4"]) != 0
    assert "exceeds the model's context" in capsys.readouterr().err


@pytest.mark.real_model
def test_demo_answers_benchmarks_and_reports(tmp_path, capsys):
    """The main job end to end on a tiny sweep: answers, a bench JSON with every configuration, a report."""
    from flexdraft.demo import run_demo

    tiny = dict(configs=("ar", "parallel", "flex", "hf"), batch_sizes=(1,), prompts=1, max_new_tokens=6, repeats=1)
    assert run_demo(num_prompts=1, max_new_tokens=6, out=tmp_path, bench=tiny) == 0
    out = capsys.readouterr().out
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert {m["config"] for m in bench["measurements"]} == set(tiny["configs"])
    assert bench["cells_done"] == bench["cells_planned"] == 1
    assert "### " in out and "report: " in out and "hf" in out
    assert "## Tokens/s and speedup per batch size" in (tmp_path / "README.md").read_text()
