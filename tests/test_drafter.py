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
    """Committed drafters: bf16 safetensors, at most 40 MiB each (the repository's one allowed binary); the draft
    vocabulary, token ids, is the one integer tensor."""
    from safetensors import safe_open

    from flexdraft.api import SHIPPED_DRAFTERS
    from flexdraft.drafter import WEIGHTS_FILE

    files = sorted(SHIPPED_DRAFTERS.glob(f"*/{WEIGHTS_FILE}"))
    assert files
    for path in files:
        assert path.stat().st_size <= 40 * 2**20, f"{path} is {path.stat().st_size} bytes"
        with safe_open(str(path), "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert {d for k, d in dtypes.items() if k != "draft_vocab"} == {"BF16"}, dtypes
        assert dtypes.get("draft_vocab", "I32") == "I32", dtypes


def test_head_weights_are_bf16_copies_on_a_cpu_and_follow_training(target, monkeypatch):
    """The engine's draft head on a CPU with fast bf16 GEMMs reads bf16 copies; an in-place update (an optimizer step)
    remakes them. Without fast bf16 (an AVX2-only CPU) it reads the fp32 weights themselves."""
    from kernels import backend

    drafter = Drafter.initialise(target, num_tuned_layers=1, block_size=4, calibration_rank=8, seed=0)
    monkeypatch.setattr(backend, "_CPU_BF16_FAST", False)
    assert drafter.head_dtype(target) == torch.float32 and drafter.head_weights(target)[0] is target.lm_head
    monkeypatch.setattr(backend, "_CPU_BF16_FAST", True)
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


# ---- the draft vocabulary ------------------------------------------------------------------------------------------
def restricted_copy(drafter, target, vocab):
    """The same drafter drafting only from ``vocab``: its calibration's output rows are the full one's rows there."""
    small = Drafter.initialise(target, drafter.config.num_tuned_layers, drafter.block_size,
                               drafter.config.calibration_rank, draft_vocab=vocab)
    state = dict(drafter.state_dict())
    order = torch.tensor(sorted(vocab))
    state["calib_w2"], state["calib_b2"] = state["calib_w2"][order], state["calib_b2"][order]
    state["draft_vocab"] = order
    small.load_state_dict(state)
    return small


def randomised(drafter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.float().std().clamp(min=0.05))
    return drafter


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_draft_vocabulary_drafts_the_best_of_its_words_and_maps_them_to_target_ids(target, temperature):
    from flexdraft.rng import Streams
    from flexdraft.sampling import SamplingParams
    from flexdraft.speculative import SpecConfig, next_drafts
    from kernels.draft_head import calibrated_logits

    V = target.config.vocab_size
    full = randomised(Drafter.initialise(target, num_tuned_layers=1, block_size=5, calibration_rank=8), 4)
    vocab = torch.randperm(V, generator=torch.Generator().manual_seed(1))[: V // 4].tolist()
    small = restricted_copy(full, target, vocab)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 5, target.config.hidden_size, generator=g)
    bonus = torch.randint(0, V, (3,), generator=g)
    params = SamplingParams(temperature)
    drafts = next_drafts(target, small, hidden, bonus, params, SpecConfig(), Streams(torch.arange(3)))
    # The reference: the full drafter's calibrated logits, with every word outside the vocabulary struck out.
    logits = calibrated_logits(hidden[:, 1:], target.norm, target.config.rms_norm_eps, target.lm_head,
                               target.embed[bonus][:, None].expand(-1, 4, -1), full.calibration).float()
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[vocab] = True
    q = torch.softmax(logits.masked_fill(~allowed, float("-inf")) / (temperature or 1.0), dim=-1)
    assert set(drafts.tokens.flatten().tolist()) <= set(vocab)
    if temperature == 0:
        assert torch.equal(drafts.tokens, q.argmax(-1))
    else:
        torch.testing.assert_close(drafts.probs, q, rtol=2e-2, atol=1e-4)   # the CPU head runs in bf16
        assert (drafts.probs[..., ~allowed] == 0).all()
    torch.testing.assert_close(drafts.confidence, q.max(-1).values, rtol=2e-2, atol=1e-4)


def test_a_draft_vocabulary_survives_save_and_load_and_a_bad_one_is_refused(target, tmp_path):
    from safetensors.torch import load_file, save_file

    vocab = [3, 17, 40, 41, 90]
    drafter = Drafter.initialise(target, num_tuned_layers=1, block_size=4, calibration_rank=8, draft_vocab=vocab)
    drafter.save(tmp_path / "d")
    stored = load_file(str(tmp_path / "d" / WEIGHTS_FILE))
    assert stored["draft_vocab"].dtype == torch.int32 and stored["calib_w2"].shape == (5, 8)
    loaded = Drafter.load(tmp_path / "d", target)
    assert loaded.draft_vocab.tolist() == vocab and loaded.config.draft_vocab_size == 5
    assert loaded.target_ids(torch.tensor([0, 4])).tolist() == [3, 90]
    assert loaded.draft_indices(torch.tensor([17, 18, 90])).tolist() == [1, -1, 4]
    stored["draft_vocab"] = torch.tensor([3, 17, 40, 41, 10**6], dtype=torch.int32)   # not a token of the target
    save_file(stored, str(tmp_path / "d" / WEIGHTS_FILE))
    with pytest.raises(FlexDraftError, match="draft vocabulary"):
        Drafter.load(tmp_path / "d", target)
