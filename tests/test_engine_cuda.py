"""The engine on a CUDA device: greedy speculative decoding equals greedy `ar` there, in every mode, with ragged
prompts and a stop in mid-batch. Skipped without a GPU; `experiments/gpu_check.sh` runs it on one."""
import pytest
import torch

from flexdraft.drafter import Drafter
from flexdraft.generate import generate_ar
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import SpecConfig, generate_speculative
from helpers import random_prompts, tiny_target
from test_speculative import MODES, step_mode, stops_mid_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", seed=5)[0].to("cuda")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_greedy_on_cuda_is_identical_to_autoregressive(target, mode, batch_size):
    prompts = random_prompts(target.config.vocab_size, [3 + (5 * i) % 11 for i in range(batch_size)], seed=batch_size)
    stop_ids = [[stops_mid_batch(target, prompts, 18), 96]] * batch_size
    drafter = Drafter.initialise(target, num_tuned_layers=2, block_size=6, seed=batch_size)
    assert drafter.mask_embedding.device.type == "cuda"
    expected, _ = generate_ar(target, prompts, 18, SamplingParams(), stop_ids, torch.arange(batch_size))
    got, stats = generate_speculative(target, drafter, prompts, 18, SamplingParams(), stop_ids,
                                      torch.arange(batch_size), step_mode(mode), SpecConfig(verify_threshold=0.0))
    assert got.results() == expected.results()
    assert expected.results()[1][0] == "stop"
    assert stats.new_tokens == sum(len(t) for t in expected.results()[0])
