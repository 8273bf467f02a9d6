"""Shared fixtures: tiny random Hugging Face checkpoints of each supported family, saved as safetensors."""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # kernels run under the Triton interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models are all per-op overhead: a second OpenMP thread only adds hand-offs (measured 5x slower on 2 cores).
# Tests on the real model get every core back, or their worker's share of them under pytest-xdist (`make test`).
ALL_THREADS = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(1)


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block with ``count`` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _threads_for_real_model(request):
    if request.node.get_closest_marker("real_model"):
        with torch_threads(ALL_THREADS):
            yield
    else:
        yield


TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def make_hf_model(family: str, seed: int = 0, widen: bool = True, **overrides):
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(TINY, **overrides)
    if family == "llama":
        config = transformers.LlamaConfig(**kwargs)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**kwargs)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        kwargs.setdefault("head_dim", 16)
        config = transformers.Qwen3Config(**kwargs)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    model = cls(config).float().eval()
    if not widen:
        return model
    with torch.no_grad():  # random init is tiny; widen it so logits have real gaps and tests can fail
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() > 1:
                p.normal_(0, 0.15)
            else:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: a saved checkpoint directory for (family, **config overrides), cached per session."""
    made = {}

    def make(family: str = "llama", **overrides):
        key = (family, json.dumps(overrides, sort_keys=True))
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            make_hf_model(family, **overrides).save_pretrained(path, safe_serialization=True)
            made[key] = path
        return made[key]

    return make
