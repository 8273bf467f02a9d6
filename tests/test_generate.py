"""Autoregressive decoding: equal to transformers' greedy generate, per-sequence random streams, exact sampling."""
import pytest
import torch

from flexdraft.generate import generate_ar
from flexdraft.rng import Streams, uniform, uniform_at
from flexdraft.sampling import (TOP_P_CANDIDATES, SamplingParams, draw, probabilities, race_noise, sample, top_p_drop,
                               top_p_drop_reference)
from helpers import random_prompts, tiny_target


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers_generate_with_ragged_batch_and_stops(family):
    ours, hf = tiny_target(family)
    prompts = random_prompts(ours.config.vocab_size, [5, 11, 2, 8], seed=1)
    free, _ = generate_ar(ours, prompts, 16, SamplingParams(), [[-1]] * 4, torch.arange(4))
    stop = free.results()[0][1][6]  # a token row 1 emits mid-way: it must stop there, others may not
    batch, stats = generate_ar(ours, prompts, 16, SamplingParams(), [[stop]] * 4, torch.arange(4))
    tokens, reasons = batch.results()
    assert reasons[1] == "stop" and "length" in reasons
    for p, out, reason in zip(prompts, tokens, reasons):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=stop,
                          pad_token_id=stop)[0, len(p):].tolist()
        assert out == ref
        assert (out[-1] == stop) == (reason == "stop")
    assert stats.mean_accepted == 1.0 and stats.new_tokens == sum(map(len, tokens))


def test_sampling_stream_of_a_sequence_does_not_depend_on_its_batch():
    ours, _ = tiny_target("llama")
    prompts = random_prompts(ours.config.vocab_size, [4, 9, 6], seed=2)
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.95)
    together, _ = generate_ar(ours, prompts, 12, params, [[-1]] * 3, torch.tensor([10, 11, 12]))
    alone, _ = generate_ar(ours, prompts[1:2], 12, params, [[-1]], torch.tensor([11]))
    other_seed, _ = generate_ar(ours, prompts[1:2], 12, params, [[-1]], torch.tensor([99]))
    assert together.results()[0][1] == alone.results()[0][0]
    assert other_seed.results()[0][0] != alone.results()[0][0]


def test_probabilities_match_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.8)
    ref = TemperatureLogitsWarper(0.7)(None, logits.clone())
    ref = TopKLogitsWarper(12)(None, ref)
    ref = TopPLogitsWarper(0.8)(None, ref)
    torch.testing.assert_close(probabilities(logits, params), torch.softmax(ref, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab", [97, 5003])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
def test_top_p_from_the_candidates_equals_the_full_sort(vocab, scale, top_p):
    """Peaked rows find their prefix among the top candidates, flat ones fall back to the sort; rows of both kinds
    share a call ([2, 3, V]); the drop mask is the full sort's, element for element."""
    gen = torch.Generator().manual_seed(vocab + int(scale * 10) + int(top_p * 1000))
    logits = torch.randn(2, 3, vocab, generator=gen) * scale
    logits[0, 1] *= 8   # one very peaked row beside the others
    probs = torch.softmax(logits, dim=-1)
    drop = top_p_drop(probs, top_p)
    assert torch.equal(drop, top_p_drop_reference(probs, top_p))
    assert not drop.all(dim=-1).any()   # the most probable token always stays


def test_top_p_takes_the_candidates_path_when_their_mass_suffices(monkeypatch):
    """The fast path is taken (a patched reference would fail the call) and still equals the sort."""
    probs = torch.softmax(torch.randn(4, 3000, generator=torch.Generator().manual_seed(5)) * 10, dim=-1)
    assert bool((probs.topk(TOP_P_CANDIDATES[0], dim=-1).values.sum(-1) >= 0.9).all())
    expected = top_p_drop_reference(probs, 0.9)
    monkeypatch.setattr("flexdraft.sampling.top_p_drop_reference", lambda *a: pytest.fail("sorted the vocabulary"))
    assert torch.equal(top_p_drop(probs, 0.9), expected)


def test_uniform_at_is_the_full_draw_at_those_elements():
    seeds, counters = torch.tensor([3, 10**12, 7]), torch.tensor([0, 5, 2])
    full = uniform(seeds, counters, 4099)
    index = torch.randint(0, 4099, (3, 37), generator=torch.Generator().manual_seed(1))
    assert torch.equal(uniform_at(seeds, counters, index), full.gather(1, index))


PEAKED, MIXED = (3.0, 9.0, 4.0, 6.0, 12.0), (0.5, 3.0, 9.0, 1.0, 6.0)


@pytest.mark.parametrize("params, scales, sparse", [
    (SamplingParams(0.8, 0, 0.95), PEAKED, True), (SamplingParams(1.3, 20, 1.0), MIXED, True),
    (SamplingParams(0.8, 0, 0.95), MIXED, False), (SamplingParams(0.7, 0, 1.0), PEAKED, False)])
def test_draw_equals_the_race_over_the_whole_vocabulary(params, scales, sparse, monkeypatch):
    """``draw`` picks what ``sample`` picks with the full noise of the same stream, over rows of different support
    in one call, and leaves the streams where the full draw would; where top-k / top-p keep few tokens in every row
    it never draws the full noise (a flat row under top-p, or no top-k / top-p, keeps too many)."""
    gen = torch.Generator().manual_seed(int(params.temperature * 10) + params.top_k + int(scales[0]))
    logits = torch.randn(5, 3001, generator=gen) * torch.tensor(scales)[:, None]
    probs = probabilities(logits, params)
    seeds = torch.tensor([1, 2, 3, 4, 99])
    for step in range(20):
        dense, ours = Streams(seeds), Streams(seeds)
        dense.counters += step
        ours.counters += step
        expected = sample(probs, dense.exponential(probs.shape[-1]))
        if sparse:
            monkeypatch.setattr(ours, "exponential", lambda shape: pytest.fail("drew the whole vocabulary's noise"))
        assert torch.equal(draw(probs, ours), expected)
        assert torch.equal(ours.counters, dense.counters)
    assert probs.gather(1, expected[:, None]).gt(0).all()


@pytest.mark.parametrize("scales, sparse", [((6.0, 9.0, 12.0, 8.0, 10.0), True), (MIXED, False)])
def test_race_noise_is_the_full_draw_wherever_a_weight_races(scales, sparse):
    """Verification races (p - q)+ or p at one of several positions: ``race_noise`` over their largest weights holds
    the full draw's variates wherever any of them is nonzero (+inf, or the full draw's own value, elsewhere), so
    every position's race picks what it picks with the full noise."""
    gen = torch.Generator().manual_seed(len(scales) + int(scales[0]))
    logits = torch.randn(5, 4, 3001, generator=gen) * torch.tensor(scales)[:, None, None]
    probs = probabilities(logits, SamplingParams(0.8, 0, 0.95))           # [B, positions, V]
    seeds = torch.tensor([5, 6, 7, 8, 9])
    full, ours = Streams(seeds).exponential(3001), Streams(seeds)
    noise = race_noise(ours, probs.amax(dim=1))
    racing = (probs > 0).any(dim=1)
    assert torch.equal(noise[racing], full[racing]) and torch.equal(ours.counters, torch.ones_like(seeds))
    assert bool(((noise == full) | noise.isinf())[~racing].all()) and bool(noise.isinf().any()) == sparse
    for position in range(probs.shape[1]):
        assert torch.equal(sample(probs[:, position], noise), sample(probs[:, position], full))


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_sampling_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.mark.real_model
def test_default_model_greedy_equals_transformers_on_mtbench():
    """Token for token, except at near-ties (top-2 logit gap under 1e-3), which are counted and reported."""
    import transformers

    from flexdraft.api import FlexDraft, resolve_model_path
    from flexdraft.assets import mtbench_prompts

    fd = FlexDraft.load("default")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(resolve_model_path("default")),
                                                          dtype=torch.float32).eval()
    prompts = mtbench_prompts()[:3]
    result = fd.generate(prompts, max_new_tokens=32, batch_size=3)
    near_ties = 0
    for out in result.outputs:
        ids = out["prompt_token_ids"]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, eos_token_id=fd.stop_ids(), pad_token_id=2)
        ref_tokens = ref.sequences[0, len(ids):].tolist()
        if out["token_ids"] != ref_tokens:
            first = next(i for i, (a, b) in enumerate(zip(out["token_ids"], ref_tokens)) if a != b)
            top2 = ref.scores[first][0].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-3, f"divergence at {first} is not a near-tie"
            near_ties += 1
    print(f"near-tie divergences: {near_ties} of {len(prompts)}")
