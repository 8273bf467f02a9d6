"""Training lowers the loss and raises acceptance on a learnable toy corpus; an interrupted run resumes exactly."""
import copy
import json
from dataclasses import replace

import pytest
import torch

from flexdraft.drafter import Drafter
from flexdraft.generate import generate_ar
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import SpecConfig, generate_speculative
from flexdraft.train import (SplitStates, TrainConfig, acceptance, clean_pass, fit_sample, pad_sequences, train,
                             walked_acceptance)
from helpers import random_prompts, tiny_target


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
    assert history[-1]["tau"] == pytest.approx(after, abs=1e-4) and 1.0 <= history[-1]["tau_walk"] <= 5
    seen = fit_sample(rows, config.eval_sequences)
    assert len(seen) == config.eval_sequences and all(any(r is s for s in rows) for r in seen)
    assert history[-1]["tau_train"] == pytest.approx(acceptance(model, drafter, seen), abs=1e-4)
    # The trained drafter is still lossless, and it now makes the engine accept more than one token per forward.
    prompts = [r["prompt_ids"] for r in held_out[:3]]
    expected, _ = generate_ar(model, prompts, 12, SamplingParams(), [[-1]] * 3, torch.arange(3))
    reloaded = Drafter.load(tmp_path / "run" / "drafter", model)
    got, stats = generate_speculative(model, reloaded, prompts, 12, SamplingParams(), [[-1]] * 3, torch.arange(3),
                                      "parallel", SpecConfig(verify_threshold=0.0, lookup=False))
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


def test_a_larger_calibration_rank_widens_a_saved_drafter(toy, tmp_path):
    """--init-from with a larger --calibration-rank starts from the saved drafter's exact calibration (the new units
    are a no-op) and then trains the new units."""
    from kernels.draft_head import calibration_logits

    model, rows, _ = toy
    train(model, rows, [], tmp_path / "a", small_config(steps=10, save_every=10), log=lambda *_: None)
    saved = Drafter.load(tmp_path / "a" / "drafter", model)
    widened = Drafter.load(tmp_path / "a" / "drafter", model)
    widened.widen_calibration(40, seed=3)
    assert widened.config.calibration_rank == 40 and widened.calib_w2.shape[1] == 40
    h = model.config.hidden_size
    normed, bonus = torch.randn(7, h), torch.randn(7, h)
    torch.testing.assert_close(calibration_logits(normed, bonus, widened.calibration),
                               calibration_logits(normed, bonus, saved.calibration))
    continued = train(model, rows, [], tmp_path / "b", small_config(steps=5, calibration_rank=40, save_every=5),
                      log=lambda *_: None, init_from=tmp_path / "a" / "drafter")
    assert Drafter.load(tmp_path / "b" / "drafter", model).config.calibration_rank == 40
    assert continued.calib_w2[:, 16:].abs().sum() > 0   # the new units learn


def test_more_tuned_layers_deepen_a_saved_drafter(toy, tmp_path):
    """--init-from with a larger --num-tuned-layers keeps the saved drafter's layers on top, adds copies of the
    target's projectors below the old split, keeps the mask vector, stays lossless and trains; fewer layers is an
    error, not a silent no-op."""
    from flexdraft.errors import FlexDraftError

    model, rows, held_out = toy
    train(model, rows, [], tmp_path / "a", small_config(steps=10, save_every=10), log=lambda *_: None)
    saved = Drafter.load(tmp_path / "a" / "drafter", model)
    deeper = Drafter.load(tmp_path / "a" / "drafter", model)
    deeper.deepen(model, 3)
    assert deeper.config.num_tuned_layers == 3 and deeper.split_layer == saved.split_layer - 1 == model.config.num_layers - 3
    for name, value in model.layers[deeper.split_layer].attn.state_dict().items():
        torch.testing.assert_close(deeper.attention(deeper.split_layer).state_dict()[name], value)
    for layer in range(saved.split_layer, model.config.num_layers):
        for name, value in saved.attention(layer).state_dict().items():
            torch.testing.assert_close(deeper.attention(layer).state_dict()[name], value)
    torch.testing.assert_close(deeper.mask_embedding, saved.mask_embedding)
    prompts = [r["prompt_ids"] for r in held_out[:3]]
    expected, _ = generate_ar(model, prompts, 12, SamplingParams(), [[-1]] * 3, torch.arange(3))
    got, _ = generate_speculative(model, deeper, prompts, 12, SamplingParams(), [[-1]] * 3, torch.arange(3),
                                  "parallel", SpecConfig(verify_threshold=0.0, lookup=False))
    assert got.results() == expected.results()
    continued = train(model, rows, [], tmp_path / "b", small_config(steps=5, num_tuned_layers=3, save_every=5),
                      log=lambda *_: None, init_from=tmp_path / "a" / "drafter")
    assert Drafter.load(tmp_path / "b" / "drafter", model).config.num_tuned_layers == 3
    added = continued.attention(continued.split_layer).wqkv
    assert not torch.equal(added, model.layers[continued.split_layer].attn.wqkv)   # the added layer learns
    with pytest.raises(FlexDraftError, match="can gain tuned layers, not lose them"):
        train(model, rows, [], tmp_path / "c", small_config(steps=1, num_tuned_layers=1), log=lambda *_: None,
              init_from=tmp_path / "a" / "drafter")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU check runs this file)")
def test_training_runs_on_a_cuda_gpu(tmp_path):
    """The same training on a CUDA device (bf16 autocast there by default): it learns, saves, resumes, and the
    drafter it writes loads on the CPU and stays lossless there."""
    model, _ = tiny_target("llama", seed=2, tie_word_embeddings=True, widen=False)
    rows, held_out = constant_runs(model.config.vocab_size, 64, 0), constant_runs(model.config.vocab_size, 12, 1)
    gpu = copy.deepcopy(model).to("cuda")
    before = acceptance(gpu, Drafter.initialise(gpu, 2, 5, 16, seed=0), held_out)
    config = small_config(bf16=None, save_every=50)
    drafter = train(gpu, rows, held_out, tmp_path / "run", replace(config, steps=50), log=lambda *_: None)
    drafter = train(gpu, rows, held_out, tmp_path / "run", config, log=lambda *_: None)   # resumes at step 50
    assert json.loads((tmp_path / "run" / "state" / "state.json").read_text())["config"]["bf16"] is True
    assert acceptance(gpu, drafter, held_out) > before + 0.5
    prompts = [r["prompt_ids"] for r in held_out[:3]]
    expected, _ = generate_ar(model, prompts, 12, SamplingParams(), [[-1]] * 3, torch.arange(3))
    got, _ = generate_speculative(model, Drafter.load(tmp_path / "run" / "drafter", model), prompts, 12,
                                  SamplingParams(), [[-1]] * 3, torch.arange(3), "parallel",
                                  SpecConfig(verify_threshold=0.0, lookup=False))
    assert got.results() == expected.results()


def test_training_with_a_draft_vocabulary(toy, tmp_path):
    """A fresh drafter drafts from the corpus's most frequent tokens (topped up to the size asked for) and learns
    as well as one over the whole vocabulary."""
    model, rows, _ = toy
    seen = {r["response_ids"][0] for r in rows}
    held_out = [dict(r, held_out=True) for r in rows[:12]]
    untrained = Drafter.initialise(model, 2, 5, 16, seed=0)
    before = acceptance(model, untrained, held_out)
    drafter = train(model, rows, held_out, tmp_path / "run", small_config(draft_vocab=len(seen) + 5),
                    log=lambda *_: None)
    vocab = set(drafter.draft_vocab.tolist())
    assert len(vocab) == len(seen) + 5 and seen <= vocab
    assert drafter.calib_w2.shape[0] == len(seen) + 5
    assert acceptance(model, drafter, held_out) > before + 0.5
    assert Drafter.load(tmp_path / "run" / "drafter", model).draft_vocab.tolist() == sorted(vocab)


def test_split_states_resume_the_clean_pass_and_compute_each_row_once(toy, tmp_path):
    model, rows, _ = toy
    ragged = [dict(r, response_ids=r["response_ids"][: 10 + 3 * i]) for i, r in enumerate(rows[:6])]
    calls = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        states = SplitStates(model, 2, ragged[:4], tmp_path / "states", bf16=False)
        assert sum(calls) == 4
        again = SplitStates(model, 2, ragged, tmp_path / "states", bf16=False)   # two new rows, four from disk
        assert sum(calls) == 6
    finally:
        hook.remove()
    tokens, lengths, _ = pad_sequences(ragged[2:6], "cpu")
    full, _ = clean_pass(model, tokens)
    resumed, _ = clean_pass(model, tokens, start=again.batch(ragged[2:6], tokens))
    for i, n in enumerate(lengths.tolist()):
        # The tuned layers see what a full pass gives them (the stored stream is bf16); the layers below are not run.
        torch.testing.assert_close(resumed.k[2:, i, :, :n], full.k[2:, i, :, :n], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(resumed.v[2:, i, :, :n], full.v[2:, i, :, :n], rtol=2e-2, atol=2e-2)
        assert (resumed.k[:2] == 0).all()
    assert torch.equal(states.states[next(iter(states.states))], again.states[next(iter(states.states))])


def test_train_on_several_corpora_keeps_each_ones_states_in_its_own_store(toy, tmp_path, monkeypatch, capsys):
    """`flexdraft train --corpus A B` trains on both; each file's split-layer states persist beside that file's
    name (so a greedy corpus's store is reused when a sampled one joins it), and the evaluation takes the first
    file's held-out answers first."""
    from types import SimpleNamespace

    import flexdraft.api
    import flexdraft.train
    from flexdraft.cli import main
    from flexdraft.train import row_key

    model, rows, held_out = toy
    parts = {"greedy": rows[:32] + held_out[:6], "sampled": rows[32:] + held_out[6:]}
    for name, part in parts.items():
        lines = [json.dumps(dict(r, held_out=any(r is h for h in held_out))) for r in part]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(flexdraft.api.FlexDraft, "load", staticmethod(lambda *_, **__: SimpleNamespace(model=model)))
    monkeypatch.setattr(flexdraft.train, "split_states_path", lambda corpus: tmp_path / "states" / corpus.stem)
    scored = []
    real_acceptance = flexdraft.train.acceptance
    monkeypatch.setattr(flexdraft.train, "acceptance",
                        lambda m, d, evaluation, *a, **k: scored.append(evaluation) or real_acceptance(m, d, evaluation,
                                                                                                         *a, **k))
    argv = ["train", "--out", str(tmp_path / "run"), "--corpus", str(tmp_path / "greedy.jsonl"),
            str(tmp_path / "sampled.jsonl"), "--steps", "3", "--num-tuned-layers", "2", "--block-size", "5",
            "--calibration-rank", "16", "--blocks-per-sequence", "4", "--eval-every", "3", "--eval-sequences", "8",
            "--bf16", "false"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "greedy.jsonl: 32 training and 6 held-out" in err and "sampled.jsonl: 32 training and 6 held-out" in err
    for name, part in parts.items():
        from safetensors.torch import load_file

        stored = load_file(str(tmp_path / "states" / name / "layer2.safetensors"))
        assert set(stored) == {row_key(r) for r in part}
    assert [row_key(r) for r in scored[0]] == [row_key(r) for r in held_out[:8]]   # greedy's six, then sampled's
    assert main(["train", "--out", str(tmp_path / "run"), "--corpus", str(tmp_path / "none.jsonl")]) != 0
    assert capsys.readouterr().err.strip().endswith("build one with `flexdraft data`")


def test_fit_steps_spends_five_sixths_of_the_time_left_at_the_measured_pace():
    from flexdraft.train import fit_steps

    assert fit_steps(20, 0.5, 600.0) == 20 + 1000
    assert fit_steps(20, 2.0, 1.0) == 21          # always at least one more step


@pytest.mark.serial
def test_a_budgeted_run_fits_its_step_count_and_ends_by_its_deadline(toy, tmp_path):
    """--minutes: after warm-up the run fits its step count to the time left; if the estimate is short, the
    deadline ends it anyway, evaluated and saved at the step it reached."""
    import time

    model, rows, held_out = toy
    said = []
    config = small_config(steps=10 ** 6, minutes=0.05, eval_every=10 ** 6, save_every=10 ** 6, eval_sequences=4)
    began = time.time()
    train(model, rows, held_out, tmp_path / "run", config, log=said.append)
    elapsed = time.time() - began
    fitted = [m for m in said if m.startswith("budget of 0.05 min:")]
    assert len(fitted) == 1, said
    planned = int(fitted[0].split(": ")[1].split()[0])
    state = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    assert 20 < state["step"] <= planned and state["config"]["steps"] == state["step"]
    assert "tau" in state["history"][-1] and state["history"][-1]["step"] == state["step"]
    assert elapsed < 3 * 60 * 0.05 + 5


def test_the_kl_term_reads_the_targets_own_next_token_distribution(toy):
    """Soft labels at a slot are the target's distribution over the draft vocabulary, predicted from the token
    before the slot, as a plain forward pass gives it."""
    from flexdraft.train import target_distribution

    model, rows, _ = toy
    vocab = list(range(0, model.config.vocab_size, 2))
    drafter = Drafter.initialise(model, 2, 5, 16, draft_vocab=vocab)
    tokens, lengths, _ = pad_sequences(rows[:2], "cpu")
    _, hidden = clean_pass(model, tokens)
    label_pos = torch.tensor([[[5, 6, 7], [20, 21, 22]], [[9, 10, 11], [30, 31, 32]]])
    got = target_distribution(model, drafter, hidden, label_pos)
    logits = model.logits(hidden)[:, :, vocab]
    for b in range(2):
        for g in range(2):
            for s in range(3):
                expected = torch.softmax(logits[b, label_pos[b, g, s] - 1], -1)
                torch.testing.assert_close(got[b, g, s], expected, rtol=1e-5, atol=1e-6)


def test_target_labels_are_the_targets_argmax_at_each_slot_in_draft_indices(toy):
    """Each slot's label is the target's greedy token after the corpus's tokens before it (a plain forward pass's
    argmax), mapped into the draft vocabulary, and -1 where the head cannot draft it."""
    from flexdraft.train import target_greedy_labels

    model, rows, _ = toy
    vocab = list(range(1, model.config.vocab_size, 3))
    drafter = Drafter.initialise(model, 2, 5, 16, draft_vocab=vocab)
    tokens, _, _ = pad_sequences(rows[3:5], "cpu")
    _, hidden = clean_pass(model, tokens)
    label_pos = torch.tensor([[[5, 6, 7], [17, 18, 19]], [[9, 10, 11], [33, 34, 35]]])
    got = target_greedy_labels(model, drafter, hidden, label_pos)
    greedy = model.logits(hidden).argmax(-1)
    index = {t: i for i, t in enumerate(vocab)}
    expected = torch.tensor([[[index.get(int(greedy[b, p - 1]), -1) for p in slots] for slots in label_pos[b]]
                             for b in range(2)])
    assert torch.equal(got, expected)
    assert (got == -1).any() and (got >= 0).any()   # both cases are exercised


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_target_labels_change_training_only_where_the_corpus_is_not_greedy(toy, tmp_path, temperature):
    """On the target's own greedy answers the target's labels are the corpus's tokens, so the run is the same step
    for step; on sampled answers they differ, and so does the run."""
    model, source, _ = toy
    prompts = [r["prompt_ids"] + r["response_ids"][:3] for r in source[:8]]
    batch, _ = generate_ar(model, prompts, 20, SamplingParams(temperature=temperature), [[-1]] * 8, torch.arange(8))
    rows = [{"prompt_ids": p, "response_ids": r, "held_out": False} for p, r in zip(prompts, batch.results()[0])]
    losses = {}
    for target_labels in (False, True):
        out = tmp_path / f"run-{target_labels}"
        train(model, rows, [], out, small_config(steps=6, target_labels=target_labels), log=lambda *_: None)
        history = json.loads((out / "state" / "state.json").read_text())["history"]
        losses[target_labels] = torch.tensor([r["loss"] for r in history])
    same = torch.allclose(losses[False], losses[True], rtol=0, atol=1e-4)
    assert same == (temperature == 0.0), losses


def test_training_with_the_kl_term_lowers_the_loss(toy, tmp_path):
    model, rows, held_out = toy
    train(model, rows, held_out, tmp_path / "run", small_config(steps=40, kl_weight=1.0), log=lambda *_: None)
    history = json.loads((tmp_path / "run" / "state" / "state.json").read_text())["history"]
    assert sum(r["loss"] for r in history[-5:]) < 0.7 * sum(r["loss"] for r in history[:5])


def test_a_calibration_only_stage_trains_the_mlp_and_nothing_else(toy, tmp_path):
    """``train_attention=False``: the projector copies and mask_embedding stay as loaded, and the calibration MLP,
    which sees the bonus (here the token every slot repeats), learns on its own, at its own learning rate."""
    from flexdraft.train import make_optimizer

    model, rows, held_out = toy
    # Rank 64 (>= the tiny model's width): the MLP can map the bonus's embedding onto its own logit.
    train(model, rows, [], tmp_path / "a", small_config(steps=5, save_every=5, calibration_rank=64),
          log=lambda *_: None)
    start = Drafter.load(tmp_path / "a" / "drafter", model)
    config = small_config(steps=60, calibration_rank=64, train_attention=False, calibration_lr=3e-2)
    peaks = [g["peak_lr"] for g in make_optimizer(config)(Drafter.load(tmp_path / "a" / "drafter", model)).param_groups]
    assert peaks == [3e-2]
    assert [g["peak_lr"] for g in make_optimizer(small_config())(start).param_groups] == [1e-2, 1e-2]
    stage = train(model, rows, held_out, tmp_path / "b", config, log=lambda *_: None,
                  init_from=tmp_path / "a" / "drafter")
    trained = stage.state_dict()
    for name, value in start.state_dict().items():
        if name.startswith("calib_"):
            assert not torch.equal(value, trained[name]), name
        else:
            assert torch.equal(value, trained[name]), name
    history = json.loads((tmp_path / "b" / "state" / "state.json").read_text())["history"]
    assert sum(r["loss"] for r in history[-5:]) < 0.7 * sum(r["loss"] for r in history[:5])
    before, after = acceptance(model, start, held_out), acceptance(model, stage, held_out)
    assert after > before + 0.3, (before, after)


def test_calibration_weight_decay_shrinks_the_calibration_mlp_alone(toy):
    """Decay pulls weights toward zero: right for the calibration MLP, wrong for the projector copies (their
    starting point is the target's own projectors), so those never decay."""
    from flexdraft.train import make_optimizer

    model, _, _ = toy
    drafter = Drafter.initialise(model, 2, 5, 16, seed=1)
    with torch.no_grad():
        for p in drafter.calibration:
            p.normal_()   # a fresh MLP's output layer starts at zero, where decay shows nothing
    before = {name: p.detach().clone() for name, p in drafter.named_parameters()}
    optimizer = make_optimizer(small_config(lr=1e-2, calibration_weight_decay=0.5))(drafter)
    for p in drafter.parameters():
        p.grad = torch.zeros_like(p)   # no gradient: what moves is the decay alone
    optimizer.step()
    calibration = {id(p) for p in drafter.calibration}
    for name, p in drafter.named_parameters():
        expected = before[name] * (1 - 1e-2 * 0.5) if id(p) in calibration else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)
    assert sum(id(p) in calibration for p in drafter.parameters()) >= 2


def test_the_engine_drafts_what_training_scores(toy, monkeypatch):
    """Training's block logits at an anchor and the engine's drafts from the same prefix are one computation: the
    prefill's block and every group of a parallel step (one per possible acceptance length) draft the argmax of
    the calibrated block logits at that anchor, with its probability. A mismatch in positions, anchors or the
    bonus fed to calibration would train one drafter and run another."""
    from flexdraft.batch import Stats
    from flexdraft.rng import Streams
    from flexdraft.speculative import mask_block, next_drafts, prefill_with_drafts
    from flexdraft.train import block_logits
    from kernels import backend

    monkeypatch.setattr(backend, "cpu_bf16_is_fast", lambda: False)   # the head in fp32, as training scores it
    model, _, _ = toy
    drafter = Drafter.initialise(model, 2, 5, 16, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():   # every weight matters (a fresh calibration MLP outputs zeros)
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std().clamp(min=0.5))
    # The target's own greedy path, so the bonus the engine resolves is the token training feeds calibration.
    prompt = torch.randint(0, model.config.vocab_size, (9,), generator=g).tolist()
    path, _ = generate_ar(model, [prompt], 20, SamplingParams(), [[-1]], torch.arange(1))
    tokens = torch.tensor([prompt + path.results()[0][0]])
    params, spec, streams = SamplingParams(), SpecConfig(), Streams(torch.tensor([0]))
    clean, _ = clean_pass(model, tokens)

    def trained_drafts(anchors: list[int]) -> tuple[list, torch.Tensor]:
        _, calibrated, _, _ = block_logits(model, drafter, clean, tokens, torch.tensor([anchors]))
        confidence, best = torch.softmax(calibrated[0], dim=-1).max(dim=-1)
        return drafter.target_ids(best).tolist(), confidence

    def engine_drafts(blocks) -> tuple[list, torch.Tensor]:
        return [d.tokens[0].tolist() for d in blocks], torch.stack([d.confidence[0] for d in blocks])

    def prefill(anchor: int):
        cache = model.new_cache(1, 40)
        _, drafts = prefill_with_drafts(model, drafter, [tokens[0, : anchor + 1].tolist()], cache, params, spec,
                                        streams, Stats())
        return cache, drafts

    def same(engine, trained):
        assert engine[0] == trained[0]
        torch.testing.assert_close(engine[1], trained[1], rtol=1e-4, atol=1e-6)
        assert engine[1].std() > 0.05   # the drafts differ, so a block read from the wrong place shows

    anchors = list(range(9, 26, 2))
    same(engine_drafts([prefill(a)[1] for a in anchors]), trained_drafts(anchors))
    # A parallel step after the prefill: [bonus, 3 drafts] at positions 10..13; group a sees the cache up to 10 + a.
    cache, _ = prefill(9)
    step = tokens[:, 10:14]
    masks = mask_block(cache.lengths, step.shape[1], drafter.block_size)
    _, mask_hidden = model(step, cache.lengths[:, None] + torch.arange(4)[None], cache, masks, drafter)
    groups = mask_hidden.view(1, 4, drafter.block_size, -1)
    same(engine_drafts([next_drafts(model, drafter, groups[:, a], tokens[:, 11 + a], params, spec, streams)
                        for a in range(4)]), trained_drafts([10, 11, 12, 13]))


def test_walked_acceptance_is_what_the_engine_measures(toy, tmp_path, monkeypatch):
    """On the target's own greedy answers, walking the teacher-forced blocks from the prompt's end gives the
    engine's mean accepted length (parallel, every draft verified, the prefill step left out) exactly: the same
    steps land on the same anchors, and the last token is never a draft."""
    from kernels import backend

    monkeypatch.setattr(backend, "cpu_bf16_is_fast", lambda: False)   # the head in fp32, as training scores it
    model, _, _ = toy
    n = 25

    def self_distilled(count, seed):
        prompts = random_prompts(model.config.vocab_size, [5 + (3 * i) % 11 for i in range(count)], seed=seed)
        stop = [[-1]] * count
        answers, _ = generate_ar(model, prompts, n, SamplingParams(), stop, torch.arange(count))
        return prompts, stop, [{"prompt_ids": p, "response_ids": r} for p, r in zip(prompts, answers.results()[0])]

    drafter = train(model, self_distilled(64, 0)[2], [], tmp_path / "run", small_config(steps=100),
                    log=lambda *_: None)
    prompts, stop, corpus = self_distilled(8, 3)
    _, stats = generate_speculative(model, drafter, prompts, n, SamplingParams(), stop, torch.arange(len(prompts)),
                                    "parallel", SpecConfig(verify_threshold=0.0, calibration=False, lookup=False))
    engine = (stats.new_tokens - len(prompts)) / (stats.row_forwards - len(prompts))
    walked = walked_acceptance(model, drafter, corpus, calibrate=False, batch=3)   # batches split unevenly
    assert 1.3 < engine < drafter.block_size   # some blocks land, some miss: the walk has work to do
    assert walked == pytest.approx(engine, rel=1e-12)
    assert walked < acceptance(model, drafter, corpus, calibrate=False)
    # Tree bound: more drafts per slot accept at least as far; every draft in the tree hits every in-range label, so
    # each step gains a whole block until the answer's last token: 24 tokens after the bonus in ceil(24 / 5) steps.
    wider = walked_acceptance(model, drafter, corpus, calibrate=False, top_k=2)
    assert wider > walked
    trimmed = walked_acceptance(model, drafter, corpus, calibrate=False, top_k=(2, 1, 1, 1))   # wide at draft 1 only
    assert walked < trimmed <= wider
    assert walked_acceptance(model, drafter, corpus, calibrate=False, top_k=(1, 1, 1, 1)) == walked
    everything = drafter.config.draft_vocab_size or model.config.vocab_size
    assert walked_acceptance(model, drafter, corpus, calibrate=False, top_k=everything) == pytest.approx(24 / 5)
