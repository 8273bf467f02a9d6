"""autotune.store: keys, provenance, and the fallback to default configs."""
from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_utils import DEVICE  # noqa: E402

from autotune import store  # noqa: E402

DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4}
TUNED = {"BLOCK_M": 64, "num_warps": 8}
KEY = store.config_key(128, 1, 64, torch.bfloat16)


def test_keys_bucket_tokens_and_batch():
    assert [store.bucket(n) for n in (0, 1, 2, 3, 16, 17, 272)] == [1, 1, 2, 4, 16, 32, 512]
    assert KEY == "d128-t1-b64-bfloat16"
    assert store.config_key(64, 272, 3, torch.float16) == "d64-t512-b4-float16"
    assert store.device_slug("NVIDIA H200") == "nvidia-h200"
    assert store.device_slug("NVIDIA GeForce RTX 4090 (Laptop)") == "nvidia-geforce-rtx-4090-laptop"


def test_a_cpu_slug_drops_trademark_marks():
    from experiments.provenance import plain_cpu_name

    assert store.device_slug("cpu " + plain_cpu_name(" Intel(R) Xeon(R) Processor") + " AVX512") == "cpu-intel-xeon-avx512"
    assert plain_cpu_name("AMD EPYC 7763 64-Core Processor") == "AMD EPYC 7763 64-Core"
    assert plain_cpu_name("AMD EPYC") == "AMD EPYC" and plain_cpu_name("(R)") == "unknown"


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A process that believes it runs on 'Fake GPU 9000', not interpreting, with its store under tmp_path."""
    monkeypatch.setattr(store, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store, "current_device_name", lambda: "Fake GPU 9000")
    monkeypatch.setattr(store, "CONFIG_DIR", tmp_path)
    monkeypatch.delenv("FLEXDRAFT_AUTOTUNE_STORE", raising=False)
    store.set_store_path(None)
    yield tmp_path / "fake-gpu-9000.json"
    store.set_store_path(None)


def write(path, device="Fake GPU 9000", **changes):
    store.write_store(path, {"block_attention": {KEY: {"config": TUNED, "us": 1.0}}}, device=device, merge=False)
    if changes:
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
    store.clear_cache()


def test_store_records_provenance(fake_gpu):
    write(fake_gpu)
    data = store.read_store(fake_gpu)
    assert data["device"] == "Fake GPU 9000" and data["schema"] == store.SCHEMA
    assert {"triton", "torch", "cuda"} <= set(data["versions"]) and data["git_commit"] and data["created"]
    assert data["kernels"]["block_attention"][KEY]["config"] == TUNED


def test_write_merges_entries_of_the_same_device(fake_gpu):
    write(fake_gpu)
    store.write_store(fake_gpu, {"draft_head": {"d576-t16-b1-bfloat16": {"config": {"BLOCK_V": 256}}}},
                      device="Fake GPU 9000")
    assert set(store.read_store(fake_gpu)["kernels"]) == {"block_attention", "draft_head"}


def test_lookup_uses_the_device_store(fake_gpu):
    write(fake_gpu)
    assert store.store_path() == fake_gpu
    assert store.lookup("block_attention", KEY, DEFAULT) == {**DEFAULT, **TUNED}
    assert store.lookup("block_attention", "d64-t1-b1-bfloat16", DEFAULT) == DEFAULT    # no entry for the key
    assert store.lookup("draft_head", KEY, DEFAULT) == DEFAULT                          # no entry for the kernel


def test_lookup_without_a_store_gives_the_default(fake_gpu):
    assert not fake_gpu.exists()
    assert store.lookup("block_attention", KEY, DEFAULT) == DEFAULT


def test_lookup_rejects_another_triton_version(fake_gpu):
    write(fake_gpu, versions={"triton": "0.0.1", "torch": "x", "cuda": "x"})
    with pytest.warns(UserWarning, match="triton 0.0.1"):
        assert store.lookup("block_attention", KEY, DEFAULT) == DEFAULT


def test_lookup_rejects_another_device(fake_gpu, tmp_path):
    other = tmp_path / "other.json"
    write(other, device="Some Other GPU")
    store.set_store_path(other)
    with pytest.warns(UserWarning, match="Some Other GPU"):
        assert store.lookup("block_attention", KEY, DEFAULT) == DEFAULT


def test_lookup_ignores_a_malformed_store(fake_gpu):
    fake_gpu.write_text('{"not": "a store"}')
    with pytest.warns(UserWarning, match="not an autotune store"):
        assert store.lookup("block_attention", KEY, DEFAULT) == DEFAULT


def test_interpreter_and_cpu_always_get_the_default(fake_gpu, monkeypatch):
    write(fake_gpu)
    assert store.lookup("block_attention", KEY, DEFAULT, device=torch.device("cpu")) == DEFAULT
    monkeypatch.setattr(store, "interpreting", lambda: True)
    assert store.lookup("block_attention", KEY, DEFAULT) == DEFAULT
    monkeypatch.setattr(store, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert store.lookup("block_attention", KEY, DEFAULT) == DEFAULT


def test_returned_config_is_a_copy(fake_gpu):
    write(fake_gpu)
    store.lookup("block_attention", KEY, DEFAULT)["BLOCK_M"] = 1
    assert store.lookup("block_attention", KEY, DEFAULT)["BLOCK_M"] == TUNED["BLOCK_M"]
    assert DEFAULT["BLOCK_M"] == 16


def test_kernels_look_up_their_key(monkeypatch):
    """The attention wrapper asks the store for (head dim, query tokens, batch, dtype) and uses what it gets."""
    import kernels.block_attention as attn
    seen = []

    def spy(kernel, key, default, device=None):
        seen.append((kernel, key))
        return default

    monkeypatch.setattr(attn, "lookup", spy)
    q = torch.randn(3, 17, 4, 16, device=DEVICE)
    cache = torch.randn(3, 2, 40, 16, device=DEVICE)
    attn.block_attention_triton(q, cache, cache, torch.full((3, 17), 39, device=DEVICE), num_clean=17)
    assert seen == [("block_attention", "d16-t32-b4-float32")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_sweep_needs_a_gpu():
    from autotune.sweep import run_sweep
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        run_sweep()


def test_the_commit_can_be_named_where_git_is_stale(monkeypatch):
    """The lent GPU machine's .git is the session start's; its commands name the commit that runs."""
    from autotune.store import git_commit
    monkeypatch.delenv("FLEXDRAFT_GIT_COMMIT", raising=False)
    here = git_commit()
    assert here != "abc123"
    monkeypatch.setenv("FLEXDRAFT_GIT_COMMIT", "abc123")
    assert git_commit() == "abc123"
