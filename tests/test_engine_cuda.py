"""The engine on a CUDA device: greedy speculative decoding equals greedy `ar` there, in every mode, with ragged
prompts and a stop in mid-batch. Skipped without a GPU; `experiments/gpu_check.sh` runs it on one."""
import pytest
import torch

from helpers import tiny_target
from test_speculative import MODES, check_greedy_is_identical_to_autoregressive

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", seed=5)[0].to("cuda")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_greedy_on_cuda_is_identical_to_autoregressive(target, mode, batch_size):
    assert target.device.type == "cuda"
    check_greedy_is_identical_to_autoregressive(target, mode, batch_size)
