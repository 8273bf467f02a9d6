"""The drafter's checkpoint: safetensors + JSON, bf16, refused by any other target, clear errors when broken."""
import json

import pytest
import torch

from flexdraft.drafter import CONFIG_FILE, WEIGHTS_FILE, Drafter
from flexdraft.errors import FlexDraftError
from helpers import tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", seed=1)[0]


def test_save_and_load_round_trip_in_bf16(target, tmp_path):
    drafter = Drafter.initialise(target, num_tuned_layers=2, block_size=6, calibration_rank=8, seed=3)
    drafter.save(tmp_path / "d")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "d" / WEIGHTS_FILE))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    loaded = Drafter.load(tmp_path / "d", target)
    assert loaded.block_size == 6 and loaded.split_layer == target.config.num_layers - 2
    for name, value in drafter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.to(torch.bfloat16).float())
    # q_norm / k_norm copies exist for Qwen3 and start equal to the target's
    assert loaded.tuned[0].q_norm is not None


def test_a_drafter_for_another_target_is_refused(target, tmp_path):
    Drafter.initialise(target, num_tuned_layers=1).save(tmp_path / "d")
    other, _ = tiny_target("qwen3", seed=2)  # same shapes, other weights
    with pytest.raises(FlexDraftError, match="trained for another target"):
        Drafter.load(tmp_path / "d", other)


def test_broken_drafters_are_clear_errors(target, tmp_path):
    with pytest.raises(FlexDraftError, match="no drafter"):
        Drafter.load(tmp_path / "missing", target)
    Drafter.initialise(target, num_tuned_layers=1).save(tmp_path / "d")
    weights = tmp_path / "d" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(FlexDraftError, match="corrupt drafter weights"):
        Drafter.load(tmp_path / "d", target)
    (tmp_path / "d" / CONFIG_FILE).write_text("{")
    with pytest.raises(FlexDraftError, match="corrupt drafter config"):
        Drafter.load(tmp_path / "d", target)


def test_save_is_atomic_when_interrupted(target, tmp_path, monkeypatch):
    drafter = Drafter.initialise(target, num_tuned_layers=1)
    drafter.save(tmp_path / "d")
    before = (tmp_path / "d" / WEIGHTS_FILE).read_bytes()
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        drafter.mask_embedding.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        drafter.save(tmp_path / "d")
    assert (tmp_path / "d" / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert json.loads((tmp_path / "d" / CONFIG_FILE).read_text())["num_tuned_layers"] == 1


@pytest.mark.real_model
def test_shipped_drafter_loads_and_stays_lossless():
    """`--drafter default` finds the committed drafter for the default model; greedy output stays identical to ar."""
    from flexdraft.api import FlexDraft, shipped_drafter_for

    fd = FlexDraft.load("default", drafter="default")
    assert shipped_drafter_for(fd.model) is not None
    assert fd.drafter.config.target["weights_sha"] == fd.model.fingerprint
    prompts = ["Write a Python function that reverses a string.", "Name three rivers in Europe."]
    ids = fd.encode(prompts)
    expected = fd.generate(prompt_ids=ids, mode="ar", max_new_tokens=24, batch_size=2)
    for mode in ("parallel", "sequential"):
        got = fd.generate(prompt_ids=ids, mode=mode, max_new_tokens=24, batch_size=2)
        assert [o["token_ids"] for o in got.outputs] == [o["token_ids"] for o in expected.outputs]
        assert got.stats.mean_accepted > 1.0  # trained drafts do get accepted


@pytest.mark.real_model
def test_shipped_drafter_refuses_another_target(tmp_path):
    from flexdraft.api import SHIPPED_DRAFTERS

    other, _ = tiny_target("llama", seed=9)
    with pytest.raises(FlexDraftError, match="trained for another target"):
        Drafter.load(next(SHIPPED_DRAFTERS.iterdir()), other)


def test_shipped_drafters_are_bf16_safetensors_within_the_size_bound():
    """Committed drafters: bf16 safetensors, at most 40 MiB each (the repository's one allowed binary)."""
    from safetensors import safe_open

    from flexdraft.api import SHIPPED_DRAFTERS
    from flexdraft.drafter import WEIGHTS_FILE

    files = sorted(SHIPPED_DRAFTERS.glob(f"*/{WEIGHTS_FILE}"))
    assert files
    for path in files:
        assert path.stat().st_size <= 40 * 2**20, f"{path} is {path.stat().st_size} bytes"
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_head_weights_are_bf16_copies_on_a_cpu_and_follow_training(target):
    """The engine's draft head on a CPU reads bf16 copies; an in-place update (an optimizer step) remakes them."""
    from kernels import backend

    drafter = Drafter.initialise(target, num_tuned_layers=1, block_size=4, calibration_rank=8, seed=0)
    lm_head, calibration = drafter.head_weights(target)
    assert lm_head.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for w in calibration)
    assert torch.equal(lm_head, target.lm_head.bfloat16()) and torch.equal(calibration[2], drafter.calib_w2.bfloat16())
    assert drafter.head_weights(target)[0] is lm_head            # made once
    with torch.no_grad():
        drafter.calib_w2.add_(1.0)
    assert torch.equal(drafter.head_weights(target)[1][2], drafter.calib_w2.bfloat16())
    previous = backend.get_backend()
    backend.set_backend("triton")   # the kernels take the weights as they are
    try:
        assert drafter.head_weights(target)[0] is target.lm_head
    finally:
        backend.set_backend(previous)
