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

    def call():
        out = step()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    benchmark.group = f"decode step b{batch}"
    benchmark.extra_info.update(mode=mode, batch=batch, tokens=tokens, context=CONTEXT)
    benchmark.pedantic(call, rounds=30 if ON_GPU else 40, iterations=3, warmup_rounds=2)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-o", "python_functions=bench_*", *sys.argv[1:]]))
