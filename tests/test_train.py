"""Training lowers the loss and raises acceptance on a learnable toy corpus; an interrupted run resumes exactly."""
import json

import pytest
import torch

from flexdraft.drafter import Drafter
from flexdraft.generate import generate_ar
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import SpecConfig, generate_speculative
from flexdraft.train import TrainConfig, acceptance, train
from helpers import tiny_target


def constant_runs(vocab, count, seed):
    """Each sequence repeats one token: every draft slot can copy it from the context, so a drafter can learn it
    (the frozen random tiny model cannot predict it on its own)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        seq = [int(torch.randint(0, vocab, (1,), generator=g))] * 40
        rows.append({"prompt_ids": seq[:4], "response_ids": seq[4:], "held_out": False})
    return rows


def small_config(**overrides):
    base = dict(steps=100, num_tuned_layers=2, block_size=5, calibration_rank=16, sequences_per_step=4,
                blocks_per_sequence=8, lr=1e-2, warmup_steps=5, eval_every=1000, save_every=20, bf16=False)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def toy():
    model, _ = tiny_target("llama", seed=2, tie_word_embeddings=True, widen=False)
    return model, constant_runs(model.config.vocab_size, 64, 0), constant_runs(model.config.vocab_size, 12, 1)


def test_training_lowers_loss_and_raises_acceptance(toy, tmp_path):
    model, rows, held_out = toy
    config = small_config()
    untrained = Drafter.initialise(model, 2, 5, 16, seed=0)
    before = acceptance(model, untrained, held_out)
    drafter = train(model, rows, held_out, tmp_path / "run", config, log=lambda *_: None)
    history = json.loads((tmp_path / "run" / "state" / "state.json").read_text())["history"]
    first, last = history[:5], history[-5:]
    assert sum(r["loss"] for r in last) < 0.7 * sum(r["loss"] for r in first)
    after = acceptance(model, drafter, held_out)
    assert after > before + 0.5, (before, after)
    # The trained drafter is still lossless, and it now makes the engine accept more than one token per forward.
    prompts = [r["prompt_ids"] for r in held_out[:3]]
    expected, _ = generate_ar(model, prompts, 12, SamplingParams(), [[-1]] * 3, torch.arange(3))
    reloaded = Drafter.load(tmp_path / "run" / "drafter", model)
    got, stats = generate_speculative(model, reloaded, prompts, 12, SamplingParams(), [[-1]] * 3, torch.arange(3),
                                      "parallel", SpecConfig(verify_threshold=0.0))
    assert got.results() == expected.results()


def test_interrupted_run_resumes_exactly(toy, tmp_path, monkeypatch):
    """Interrupt right after the step-8 checkpoint, resume, and land on the weights of an uninterrupted run."""
    import flexdraft.train as training

    model, rows, _ = toy
    config = small_config(steps=16, save_every=8)
    straight = train(model, rows, [], tmp_path / "a", config, log=lambda *_: None)

    class Interrupt(Exception):
        pass

    real_save = training.save_state

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupt

    monkeypatch.setattr(training, "save_state", save_then_interrupt)
    with pytest.raises(Interrupt):
        train(model, rows, [], tmp_path / "b", config, log=lambda *_: None)
    monkeypatch.setattr(training, "save_state", real_save)
    assert json.loads((tmp_path / "b" / "state" / "state.json").read_text())["step"] == 8
    resumed = train(model, rows, [], tmp_path / "b", config, log=print)
    history = json.loads((tmp_path / "b" / "state" / "state.json").read_text())["history"]
    assert [r["step"] for r in history] == list(range(1, 17))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_training_can_continue_from_a_saved_drafter(toy, tmp_path):
    """The committed drafter is a starting point: --init-from loads its weights (bf16 as stored) to train on."""
    model, rows, _ = toy
    train(model, rows, [], tmp_path / "a", small_config(steps=10, save_every=10), log=lambda *_: None)
    saved = Drafter.load(tmp_path / "a" / "drafter", model)
    continued = train(model, rows, [], tmp_path / "b", small_config(steps=1, lr=0.0, warmup_steps=1),
                      log=lambda *_: None, init_from=tmp_path / "a" / "drafter")
    for (name, a), b in zip(saved.state_dict().items(), continued.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
