"""kernels.cpu_attention (a decode step's block attention in C, fp32 on a CPU) against block_attention_reference:
decode, prefill-sized, sequential and parallel mask groups, tree steps, odd head sizes, both vector widths."""
from __future__ import annotations

import pytest
import torch
from kernel_utils import assert_close, poisoned_allocations, seeded
from test_kernel_block_attention import CASES, make_step, make_tree_step

from kernels import block_attention as attention
from kernels import cpu_attention, cpu_matmul

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason=f"the CPU kernels are unavailable here: "
                                  f"{cpu_matmul.why_unavailable()}")
WIDTHS = [8, 16] if cpu_matmul.available() and cpu_matmul.ISA.width == 16 else [8]


def on_cpu(step: dict) -> dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in step.items()}


def c_attention(step: dict, width: int | None = None) -> torch.Tensor:
    with poisoned_allocations():
        return cpu_attention.block_attention(**step, width=width)


@needs_kernel
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_reference(name, width):
    """The block attention cases (ragged limits, GQA, one sequence starting empty, mask groups, strided views),
    outputs poisoned."""
    step = on_cpu(make_step(name, torch.float32, seed=11))
    assert_close(c_attention(step, width), attention.block_attention_reference(**step))


@needs_kernel
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("slots,group_size", [(12, 0), (attention.MAX_TREE_SLOTS, 0), (7, 3)],
                         ids=["12-nodes", "64-nodes", "7-nodes-with-mask-groups"])
def test_tree_steps_match_the_reference(slots, group_size, width):
    step, _ = make_tree_step(torch.float32, seed=slots + 1, slots=slots, group_size=group_size)
    step = on_cpu(step)
    assert_close(c_attention(step, width), attention.block_attention_reference(**step))


@needs_kernel
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("head_dim", [4, 8, 24, 64, 72, 128])
def test_odd_head_sizes_and_long_caches(head_dim, width):
    """Head sizes below, between and above whole vectors; 700 visible keys (many blocks of keys, a partial last
    one); scores spread wide enough that some weights underflow."""
    gen = seeded(head_dim)
    B, T, Hq, Hkv, S = 2, 3, 8, 2, 800
    q = torch.randn(B, T, Hq, head_dim, generator=gen) * 3
    k_cache, v_cache = torch.randn(2, B, Hkv, S, head_dim, generator=gen)
    kv_limit = torch.tensor([[697, 698, 699], [0, 5, 450]])
    step = dict(q=q, k_cache=k_cache, v_cache=v_cache, kv_limit=kv_limit, k_mask=None, v_mask=None, num_clean=T)
    assert_close(c_attention(step, width), attention.block_attention_reference(**step))


@needs_kernel
def test_a_row_does_not_depend_on_the_rows_beside_it():
    """A verify row gets exactly the numbers an autoregressive row gets: each query token of a 9-token step
    equals the same token attended alone (bits), at one thread or two."""
    step = on_cpu(make_step("prefill-17", torch.float32, seed=3))
    together = cpu_attention.block_attention(**step)
    for t in range(0, 17, 4):
        alone = dict(step, q=step["q"][:, t:t + 1], kv_limit=step["kv_limit"][:, t:t + 1], num_clean=1)
        assert torch.equal(cpu_attention.block_attention(**alone), together[:, t:t + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_attention.block_attention(**step), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_the_extent_bounds_the_cache_and_a_limit_outside_it_raises():
    step = on_cpu(make_step("decode-gqa3", torch.float32, seed=4))
    bounded = dict(step, kv_extent=50)
    assert_close(cpu_attention.block_attention(**bounded),
                 attention.block_attention_reference(**dict(step, kv_limit=step["kv_limit"].clamp(max=49))))
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_attention.block_attention(**dict(step, kv_limit=step["kv_limit"] + 300))


@needs_kernel
def test_the_dispatcher_runs_c_for_fp32_decode_steps_only(monkeypatch):
    """On the torch backend a CPU fp32 step takes C; with its arguments from step_arguments (no visibility mask);
    bf16, tracked gradients and long prefills take the reference."""
    calls = []
    real = cpu_attention.block_attention
    monkeypatch.setattr(cpu_attention, "block_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    step = on_cpu(make_step("parallel-3-groups", torch.float32, seed=5))
    shared = {key: step.pop(key) for key in ("kv_limit", "num_clean", "group_size")}
    head_dim = step["q"].shape[-1]
    assert cpu_attention.takes_c_path(step["q"], step["k_cache"], step["v_cache"], shared["kv_limit"],
                                      step["k_mask"], step["v_mask"], None)
    with torch.no_grad():
        args = attention.step_arguments(**shared, head_dim=head_dim)
        assert "allowed" not in args and cpu_attention.serves_step(shared["kv_limit"], torch.float32, head_dim)
        assert "allowed" in attention.step_arguments(**shared, head_dim=head_dim + 4)   # not whole vectors
        out = attention.block_attention(**step, **args)
    assert calls == [1]
    assert_close(out, attention.block_attention_reference(**step, **shared))
    q = step["q"]
    assert not cpu_attention.takes_c_path(q.bfloat16(), *[step[k] for k in ("k_cache", "v_cache")],
                                          shared["kv_limit"], step["k_mask"], step["v_mask"], None)
    tracked = q.detach().requires_grad_()
    assert not cpu_attention.takes_c_path(tracked, step["k_cache"], step["v_cache"], shared["kv_limit"],
                                          step["k_mask"], step["v_mask"], None)
    assert "allowed" in attention.step_arguments(**shared, head_dim=head_dim)   # gradients on: the reference's mask
    assert not cpu_attention.takes_c_path(q[..., :-4], step["k_cache"][..., :-4], step["v_cache"][..., :-4],
                                          shared["kv_limit"], step["k_mask"][..., :-4], step["v_mask"][..., :-4], None)
    long = torch.zeros(1, cpu_attention.MAX_QUERIES + 1, dtype=torch.int64)
    assert not cpu_attention.serves_step(long, torch.float32, head_dim)
    assert "allowed" in attention.step_arguments(shared["kv_limit"], 3, dtype=torch.bfloat16, head_dim=head_dim)


@needs_kernel
def test_a_failed_build_leaves_the_reference_running(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cc failed: test")

    monkeypatch.setattr(cpu_attention, "LIBRARIES", {})
    monkeypatch.setattr(cpu_attention, "compile_library", broken)
    step = on_cpu(make_step("decode-gqa3", torch.float32, seed=6))
    assert not cpu_attention.takes_c_path(step["q"], step["k_cache"], step["v_cache"], step["kv_limit"], None, None,
                                          None)
    assert cpu_attention.LIBRARIES[cpu_matmul.ISA.width].why_not == "cc failed: test"
    with torch.no_grad():
        out = attention.block_attention(**step)
    assert_close(out, attention.block_attention_reference(**step))


@needs_kernel
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_engine_on_heads_of_whole_vectors_takes_c_and_stays_lossless(monkeypatch, mode, batch_size):
    """The tests' usual tiny model has heads of 8 floats, which keep the reference; one with heads of 16 runs its
    decode steps (trees at batch 1, mask groups, ragged prompts, a row stopping early) through the C attention, and
    greedy output still equals autoregressive decoding's."""
    from helpers import random_prompts, tiny_target

    from flexdraft.drafter import Drafter
    from flexdraft.generate import generate_ar
    from flexdraft.sampling import SamplingParams
    from flexdraft.speculative import SpecConfig, generate_speculative

    model, _ = tiny_target("llama", seed=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert model.config.head_dim == 16
    drafter = Drafter.initialise(model, num_tuned_layers=2, block_size=4, seed=2)
    calls = []
    real = cpu_attention.block_attention
    monkeypatch.setattr(cpu_attention, "block_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = random_prompts(model.config.vocab_size, [6, 11, 3][:batch_size], seed=batch_size)
    free, _ = generate_ar(model, prompts, 16, SamplingParams(), [[-1]] * batch_size, torch.arange(batch_size))
    stops = [[free.results()[0][0][4]]] + [[-1]] * (batch_size - 1)   # the first row stops early
    expected, _ = generate_ar(model, prompts, 16, SamplingParams(), stops, torch.arange(batch_size))
    got, _ = generate_speculative(model, drafter, prompts, 16, SamplingParams(), stops, torch.arange(batch_size),
                                  mode, SpecConfig(verify_threshold=0.0))
    assert got.results() == expected.results()
    assert calls
