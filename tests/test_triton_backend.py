"""With the Triton kernels switched on (interpreted on a CPU), decoding is token for token the torch backend's."""
import pytest
import torch

from flexdraft.drafter import Drafter
from flexdraft.generate import generate_ar
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import SpecConfig, generate_speculative
from helpers import random_prompts, tiny_target
from kernels import backend


@pytest.fixture
def triton_backend(monkeypatch):
    """Switch to the kernels and count their launches, so the test knows they really ran."""
    import kernels.block_attention
    import kernels.draft_head
    import kernels.verify

    calls = {}
    for module, name in [(kernels.block_attention, "block_attention_triton"), (kernels.draft_head, "draft_head_triton"),
                         (kernels.verify, "verify_greedy_triton"), (kernels.verify, "verify_sampling_triton")]:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    previous = backend.get_backend()
    backend.set_backend("triton")
    yield calls
    backend.set_backend(previous)


def run_all_modes(model, drafter, prompts, params):
    stops = [[-1]] * len(prompts)
    seeds = torch.arange(len(prompts))
    runs = {"ar": generate_ar(model, prompts, 6, params, stops, seeds)[0].results()}
    for mode in ("parallel", "sequential"):
        runs[mode] = generate_speculative(model, drafter, prompts, 6, params, stops, seeds, mode,
                                          SpecConfig(verify_threshold=0.0, tree_nodes=0))[0].results()
    runs["sequential-tree"] = generate_speculative(model, drafter, prompts, 6, params, stops, seeds, "sequential",
                                                   SpecConfig(verify_threshold=0.0, tree_nodes=5, tree_batch=2)
                                                   )[0].results()
    return runs


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8)], ids=["greedy", "sampling"])
def test_triton_backend_decodes_exactly_like_torch(params, request):
    model, _ = tiny_target("llama", seed=4, num_hidden_layers=2)
    drafter = Drafter.initialise(model, num_tuned_layers=1, block_size=3, calibration_rank=8, seed=2)
    prompts = random_prompts(model.config.vocab_size, [3, 6], seed=3)
    expected = run_all_modes(model, drafter, prompts, params)
    calls = request.getfixturevalue("triton_backend")
    got = run_all_modes(model, drafter, prompts, params)
    verify_kernel = "verify_greedy_triton" if params.greedy else "verify_sampling_triton"
    assert calls["block_attention_triton"] > 0 and calls["draft_head_triton"] > 0 and calls[verify_kernel] > 0
    assert got == expected
    assert got["parallel"] == got["ar"] or not params.greedy
