"""The GPU training run, rehearsed on the CPU: the payload fits the device's per-call limit, the target is rebuilt
from GGUF parts with its own fingerprint, prompts the corpus has not answered are answered into it, a drafter trains
from the shipped one, and what comes back (at most eight files under 16 MiB) reassembles into a drafter the local
target accepts and the new answers the local corpus lacks."""
import json
import lzma
import shutil

import pytest

pytestmark = pytest.mark.real_model


def made_up_corpus(path, rows: int):
    """A small greedy corpus of random answers: the rehearsal needs rows to train on, not good ones, and must not
    depend on the machine's own corpus (the cache does not survive between tasks)."""
    import random

    rng = random.Random(0)
    path.write_text("".join(json.dumps({
        "key": f"made-up-{i:03d}", "prompt_ids": [1] + [rng.randrange(2, 49152) for _ in range(rng.randrange(4, 30))],
        "response_ids": [rng.randrange(2, 49152) for _ in range(rng.randrange(8, 40))],
        "finish_reason": "length", "held_out": i % 8 == 0}) + "\n" for i in range(rows)))
    return path


def landed(folders, there, call_mib: float):
    """Each call's folder under ``call_mib``, and what the device calls leave in /tmp/payload: ``there``."""
    for folder in folders:
        assert sum(p.stat().st_size for p in folder.iterdir()) <= call_mib * 2 ** 20
    there.mkdir()
    for folder in folders:
        for p in folder.iterdir():
            shutil.copy(p, there / p.name)
    return there


def test_prepare_run_and_collect_rehearse_the_gpu_training_run(tmp_path, monkeypatch):
    from experiments import gpu_train
    from flexdraft.data import read_corpus

    home = made_up_corpus(tmp_path / "home-corpus.jsonl", 40)
    folders = gpu_train.prepare(tmp_path / "payload", call_mib=40, max_prompts=8, corpus=home)
    assert len(folders) == 3   # 98 MB of GGUF and the small files, 40 MiB at a time
    there = landed(folders, tmp_path / "there", 40)

    monkeypatch.setenv("FLEXDRAFT_CACHE", str(tmp_path / "cache"))   # the GPU machine's own, empty, cache
    out = tmp_path / "out"
    summary = gpu_train.run(there, out, minutes=4, dry_run=True)
    assert summary["manifest"]["prompts"] == 8 and summary["new_rows"] == 6 and summary["trained_steps"] >= 1, summary
    returned = list(out.iterdir())
    assert len(returned) <= 8 and all(p.stat().st_size < 16 * 2 ** 20 for p in returned), returned
    corpus = tmp_path / "cache" / "corpus" / summary["manifest"]["corpus_name"]
    rows = read_corpus(corpus)
    assert len(rows) == 46 and all(len(r["response_ids"]) >= 1 for r in rows[40:])
    sent = [json.loads(line) for line in lzma.open(there / "prompts.jsonl.xz", "rt")]
    assert sorted((r["key"], r["prompt_ids"]) for r in rows[40:]) == sorted((r["key"], r["prompt_ids"]) for r in sent[:6])

    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))   # home: the corpus before the run
    got = gpu_train.collect(out, tmp_path / "collected")
    gpu_train.collect(out, tmp_path / "collected")   # twice: an answer already home is not appended again
    assert read_corpus(corpus) == rows
    trained = tmp_path / "cache" / "runs" / "gpu_train" / "drafter" / "drafter.safetensors"
    assert summary["run_dir"] == str(trained.parent.parent)
    assert (got / "drafter.safetensors").read_bytes() == trained.read_bytes()
    assert json.loads((tmp_path / "collected" / "state.json").read_text())["step"] == summary["trained_steps"]


def test_prepare_without_a_local_corpus_sends_every_turn_to_be_answered_there(tmp_path):
    from experiments import gpu_train

    folders = gpu_train.prepare(tmp_path / "payload", call_mib=40, max_prompts=5, corpus=tmp_path / "none.jsonl")
    files = {p.name: p for folder in folders for p in folder.iterdir()}
    manifest = json.loads(files["manifest.json"].read_text())
    assert manifest["rows"] == 0 and manifest["prompts"] == 5
    assert lzma.open(files["corpus.jsonl.xz"], "rt").read() == ""
    sent = [json.loads(line) for line in lzma.open(files["prompts.jsonl.xz"], "rt")]
    assert len(sent) == 5 and len({r["key"] for r in sent}) == 5 and all(len(r["prompt_ids"]) > 1 for r in sent)
