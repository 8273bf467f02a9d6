"""draft_head_triton against draft_head_reference: greedy and sampling, with and without calibration."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_utils import DEVICE, DTYPES, TOLERANCE, gpu_only, poisoned_allocations, randn, seeded  # noqa: E402

from flexdraft.sampling import SamplingParams, probabilities  # noqa: E402
from kernels import backend  # noqa: E402
from kernels.draft_head import (calibrated_logits, draft_head, draft_head_launch, draft_head_reference,  # noqa: E402
                                draft_head_triton)

# several vocab tiles (the last one partial), two hidden chunks (the last partial), rank r not a tile multiple
SMALL = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
HIDDEN, VOCAB, RANK = 48, 300, 40
GREEDY = SamplingParams()
TEMPERATURE = SamplingParams(temperature=0.7)
TOP_K_P = SamplingParams(temperature=0.9, top_k=20, top_p=0.8)


def make_head(rows: int, dtype: torch.dtype, seed: int = 0, calibrated: bool = True, params=GREEDY,
              noise_dtype=torch.float64, hidden=HIDDEN, vocab=VOCAB, rank=RANK) -> tuple[tuple, dict]:
    gen = seeded(seed)
    calibration = None
    if calibrated:
        calibration = (randn(rank, 2 * hidden, gen=gen, dtype=dtype, scale=hidden ** -0.5),
                       randn(rank, gen=gen, dtype=dtype, scale=0.1),
                       randn(vocab, rank, gen=gen, dtype=dtype, scale=rank ** -0.5),
                       randn(vocab, gen=gen, dtype=dtype, scale=0.1))
    args = (randn(rows, hidden, gen=gen, dtype=dtype, scale=3.0), 1.0 + randn(hidden, gen=gen, dtype=dtype, scale=0.1),
            1e-6, randn(vocab, hidden, gen=gen, dtype=dtype, scale=hidden ** -0.5),
            randn(rows, hidden, gen=gen, dtype=dtype), calibration)
    noise = None
    if not params.greedy:
        noise = (-torch.log(torch.rand(rows, vocab, generator=gen, dtype=torch.float64))).to(DEVICE, noise_dtype)
    return args, dict(params=params, race_noise=noise)


def check(out, ref, args, kwargs, dtype):
    """Low precision may flip a near-tie; the kernel's token must then be a (near-)best one under the reference."""
    tokens, token_prob, max_prob, probs = out
    ref_tokens, ref_token_prob, ref_max_prob, ref_probs = ref
    rtol, atol = TOLERANCE[dtype]
    assert tokens.dtype == torch.int64 and token_prob.dtype == max_prob.dtype == torch.float32
    torch.testing.assert_close(max_prob, ref_max_prob, rtol=rtol, atol=atol)
    if kwargs["params"].greedy:
        assert probs is None
    else:
        torch.testing.assert_close(probs, ref_probs, rtol=rtol, atol=atol)
    if dtype == torch.float32:
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(token_prob, ref_token_prob, rtol=rtol, atol=atol)
        return
    ref_full = probabilities(calibrated_logits(*args), kwargs["params"])
    score = ref_full if kwargs["params"].greedy else ref_full / kwargs["race_noise"]
    best = score.max(dim=-1).values
    chosen = score.gather(-1, tokens[:, None]).squeeze(-1)
    assert bool((chosen >= best * (1 - 20 * rtol) - atol).all()), "kernel token is not a near-best token"
    torch.testing.assert_close(token_prob, ref_full.gather(-1, tokens[:, None]).squeeze(-1), rtol=rtol, atol=atol)


def run(args, kwargs, config):
    with poisoned_allocations():
        return draft_head_launch(*args, **kwargs, config=config)


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "plain"])
@pytest.mark.parametrize("params", [GREEDY, TEMPERATURE, TOP_K_P], ids=["greedy", "temperature", "top-k-p"])
def test_matches_reference_fp32(rows, calibrated, params):
    args, kwargs = make_head(rows, torch.float32, seed=rows, calibrated=calibrated, params=params)
    check(run(args, kwargs, SMALL), draft_head_reference(*args, **kwargs), args, kwargs, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("params", [GREEDY, TEMPERATURE], ids=["greedy", "temperature"])
def test_matches_reference_low_precision(dtype, params):
    args, kwargs = make_head(17, dtype, seed=7, params=params)
    check(run(args, kwargs, SMALL), draft_head_reference(*args, **kwargs), args, kwargs, dtype)


@pytest.mark.parametrize("params", [GREEDY, TEMPERATURE], ids=["greedy", "temperature"])
def test_reference_with_bf16_weights_for_an_fp32_model(params):
    """The CPU engine's head: fp32 hidden states, bf16 copies of the vocabulary weights (``Drafter.head_weights``).
    It must stay within bf16 error of the all-fp32 head."""
    args, kwargs = make_head(17, torch.float32, seed=11, params=params)
    hidden, norm_weight, eps, lm_head, bonus_emb, calibration = args
    low = (hidden, norm_weight, eps, lm_head.bfloat16(), bonus_emb, tuple(w.bfloat16() for w in calibration))
    check(draft_head_reference(*low, **kwargs), draft_head_reference(*args, **kwargs), args, kwargs, torch.bfloat16)


def test_float32_race_noise():
    args, kwargs = make_head(17, torch.float32, seed=8, params=TEMPERATURE, noise_dtype=torch.float32)
    check(run(args, kwargs, SMALL), draft_head_reference(*args, **kwargs), args, kwargs, torch.float32)


def test_public_wrapper_default_config():
    args, kwargs = make_head(17, torch.float32, seed=9, params=TEMPERATURE)
    with poisoned_allocations():
        out = draft_head_triton(*args, **kwargs)
    check(out, draft_head_reference(*args, **kwargs), args, kwargs, torch.float32)


def test_dispatcher_uses_the_kernel():
    args, kwargs = make_head(5, torch.float32, seed=10)
    previous = backend.get_backend()
    backend.set_backend("triton")
    try:
        with poisoned_allocations():
            out = draft_head(*args, **kwargs)
    finally:
        backend.set_backend(previous)
    check(out, draft_head_reference(*args, **kwargs), args, kwargs, torch.float32)


# ---- GPU only: bf16 at the real vocabulary sizes -----------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("model,rows", [("smollm2-135m", 15), ("smollm2-135m", 960), ("qwen3-8b", 240)])
@pytest.mark.parametrize("params", [GREEDY, TEMPERATURE], ids=["greedy", "temperature"])
def test_real_shapes_bf16(model, rows, params):
    from autotune.spaces import MODELS
    m = MODELS[model]
    args, kwargs = make_head(rows, torch.bfloat16, seed=11, params=params, hidden=m["hidden"], vocab=m["vocab"],
                             rank=m["rank"])
    with poisoned_allocations():
        out = draft_head_triton(*args, **kwargs)
    check(out, draft_head_reference(*args, **kwargs), args, kwargs, torch.bfloat16)
