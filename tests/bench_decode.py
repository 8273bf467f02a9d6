"""Benchmarks: one decode step per mode (pytest-benchmark), the engine's own step functions on prepared state.

Not collected by ``pytest tests`` (the file name does not match test_*.py). Run it with

    pytest tests/bench_decode.py --benchmark-only -o python_functions='bench_*'
    python -m experiments.regress        # against the stored baseline benchmarks/<device>/decode.json

On a CPU the model is the tests' tiny one on one thread: a step is mostly per-op overhead, which is what a code
change moves. On a GPU it is a random model of SmolLM2-135M's shape.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # helpers, also when run as a script
from helpers import tiny_target  # noqa: E402

from experiments.roofline import STEP_OPS, op_call  # noqa: E402
from flexdraft.drafter import Drafter  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048)
CONTEXT = 256 if ON_GPU else 48
VERIFY = 3                         # drafts verified per step (clean tokens = VERIFY + 1)


@pytest.fixture(scope="module")
def target():
    model, _ = tiny_target("llama", seed=0, **(SMOLLM2 if ON_GPU else dict(max_position_embeddings=256)))
    if ON_GPU:
        model = model.to("cuda", torch.bfloat16)
    block = 16 if ON_GPU else 6
    return model, Drafter.initialise(model, num_tuned_layers=max(1, model.config.num_layers // 4), block_size=block)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", list(STEP_OPS))
def bench_decode_step(benchmark, target, mode, batch):
    model, drafter = target
    tokens = 1 if mode == "ar" else VERIFY + 1
    cache = model.new_cache(batch, CONTEXT + tokens + 1)
    step = op_call(STEP_OPS[mode], model, drafter, cache, batch, tokens, CONTEXT)

    benchmark.group = f"decode step b{batch}"
    benchmark.extra_info.update(mode=mode, batch=batch, tokens=tokens, context=CONTEXT)
    benchmark.pedantic(synced(step), rounds=30 if ON_GPU else 40, iterations=3, warmup_rounds=2)


def synced(fn):
    """``fn`` timed to its end: on a GPU each call waits for the kernels it launched."""
    def call():
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return out
    return call


def peaked_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits shaped like a chat model's: a few likely tokens over a long tail (top-p 0.95 keeps a handful)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 2
    logits[:, torch.randint(0, vocab, (8,), generator=gen)] += 12
    return logits


@pytest.mark.parametrize("batch", [1, 8])
def bench_sampled_token(benchmark, batch):
    """The target's sampled token per row (temperature 0.8, top-p 0.95) over SmolLM2's 49,152-word vocabulary:
    what an ``ar`` step adds when sampling."""
    from flexdraft.generate import choose_tokens
    from flexdraft.rng import Streams
    from flexdraft.sampling import SamplingParams

    logits = peaked_logits(batch, SMOLLM2["vocab_size"], batch).to(DEVICE)
    streams, params = Streams(torch.arange(batch, device=DEVICE)), SamplingParams(0.8, 0, 0.95)
    benchmark.group = "sampling"
    benchmark.pedantic(synced(lambda: choose_tokens(logits, params, streams)), rounds=40, iterations=5, warmup_rounds=2)


def bench_sampled_tree_walk(benchmark):
    """A sampled tree step's verification at batch 1 (8 nodes, depth up to 4, 49,152 words): the walk draws the
    target's sample at each depth it reaches."""
    from flexdraft.rng import Streams
    from flexdraft.sampling import SamplingParams
    from flexdraft.speculative import accept_tree
    from flexdraft.tree import build_tree

    V, nodes = SMOLLM2["vocab_size"], 8
    gen = torch.Generator().manual_seed(7)
    top_tokens = torch.randint(0, V, (1, 4, 3), generator=gen)
    tree = build_tree(top_tokens.to(DEVICE), torch.tensor([[[0.6, 0.2, 0.1]] * 4], device=DEVICE), nodes, 0.01)
    logits = peaked_logits(tree.num_nodes + 1, V, 3)[None].to(DEVICE)
    params = SamplingParams(0.8, 0, 0.95)

    def walk_once():
        cache = model_free_cache(DEVICE)
        return accept_tree(logits, tree, cache, params, Streams(torch.arange(1, device=DEVICE)))

    benchmark.group = "sampling"
    benchmark.pedantic(synced(walk_once), rounds=40, iterations=3, warmup_rounds=2)


def bench_sampled_chain_verification(benchmark):
    """A sampled chain step's verification at batch 8 (3 drafts per row, 49,152 words): the target's probabilities
    at every position and one race for each row's resolved token."""
    from flexdraft.rng import Streams
    from flexdraft.sampling import SamplingParams, probabilities
    from flexdraft.speculative import Drafts, verify

    B, n, V = 8, 3, SMOLLM2["vocab_size"]
    params = SamplingParams(0.8, 0, 0.95)
    logits = peaked_logits(B * (n + 1), V, 5).view(B, n + 1, V).to(DEVICE)
    draft_probs = probabilities(peaked_logits(B * n, V, 6).view(B, n, V), params).to(DEVICE)
    drafts = Drafts(draft_probs.argmax(dim=-1), draft_probs.amax(dim=-1), draft_probs)
    num_drafts, kv_len = torch.full((B,), n, device=DEVICE), torch.full((B,), 40, device=DEVICE)
    seeds = torch.arange(B, device=DEVICE)
    benchmark.group = "sampling"
    benchmark.pedantic(synced(lambda: verify(logits, drafts, num_drafts, kv_len, params, Streams(seeds))),
                       rounds=30, iterations=2, warmup_rounds=2)


def model_free_cache(device):
    """The least of a KV cache that ``accept_tree`` moves the accepted path's K/V in: one layer, one head."""
    from types import SimpleNamespace

    from flexdraft.model import KVCache

    cache = KVCache(SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=4), 1, 32, torch.float32, device)
    cache.lengths += 10
    return cache


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-o", "python_functions=bench_*", *sys.argv[1:]]))
