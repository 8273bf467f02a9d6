"""Benchmarks: each Triton kernel against its torch reference (pytest-benchmark).

Not collected by ``pytest tests`` (the file name does not match test_*.py). Run it with

    pytest tests/bench_kernels.py --benchmark-only -o python_functions='bench_*'
    python tests/bench_kernels.py            # the same

On CPU the kernels run in the Triton interpreter on tiny shapes: a smoke test of the benchmark itself, not a
measurement. On a GPU the shapes are the real ones (Qwen3-8B / SmolLM2 heads, vocabularies, batch 1..64).
Every benchmark checks the kernel against the reference before timing it.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # kernel_utils, also when run as a script
from kernel_utils import DEVICE, ON_GPU, gguf_weight  # noqa: E402

from autotune.spaces import MODELS, attention_inputs, draft_head_inputs, verify_inputs  # noqa: E402
from kernels import cpu_attention, cpu_matmul, cpu_rowwise  # noqa: E402
from kernels.block_attention import (block_attention_reference, block_attention_triton,  # noqa: E402
                                     visibility)
from kernels.draft_head import draft_head_reference, draft_head_triton  # noqa: E402
from kernels.verify import (verify_greedy_reference, verify_greedy_triton, verify_sampling_reference,  # noqa: E402
                            verify_sampling_triton)

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
PROVIDERS = ["triton", "torch"]


def timed(benchmark, fn):
    """Benchmark ``fn`` (synchronising the GPU so the time is the kernel's, not the launch's)."""
    def call():
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return out
    call()   # warm up: compile outside the timing
    if ON_GPU:
        return benchmark.pedantic(call, rounds=50, iterations=5, warmup_rounds=2)
    return benchmark.pedantic(call, rounds=2, iterations=1)


# ---- attention -------------------------------------------------------------------------------------------------------
if ON_GPU:
    ATTENTION = [(model, mode, batch) for model in ("smollm2-135m", "qwen3-8b")
                 for mode in ("decode", "sequential", "parallel", "tree") for batch in (1, 16, 64)]
else:
    ATTENTION = [("tiny", mode, 2) for mode in ("decode", "sequential", "parallel", "tree")]


def attention_case(model, mode, batch):
    if model == "tiny":
        return attention_inputs(batch, mode, head_dim=16, heads=4, kv_heads=2, cache_len=64, dtype=DTYPE,
                                device=DEVICE, drafts=2, group_size=4)
    m = MODELS[model]
    return attention_inputs(batch, mode, head_dim=m["head_dim"], heads=m["heads"], kv_heads=m["kv_heads"],
                            cache_len=1024, dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model,mode,batch", ATTENTION)
def bench_block_attention(benchmark, provider, model, mode, batch):
    x = attention_case(model, mode, batch)
    fn = block_attention_triton if provider == "triton" else block_attention_reference
    if provider == "triton":
        torch.testing.assert_close(fn(**x).float(), block_attention_reference(**x).float(), rtol=2e-2, atol=2e-2)
    benchmark.group = f"block_attention {model} {mode} b{batch}"
    timed(benchmark, lambda: fn(**x))


# ---- draft head --------------------------------------------------------------------------------------------------
DRAFT_HEAD = [(m, rows) for m in ("smollm2-135m", "qwen3-8b") for rows in (15, 240, 960)] if ON_GPU else [("tiny", 17)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model,rows", DRAFT_HEAD)
def bench_draft_head(benchmark, provider, model, rows):
    m = dict(hidden=48, vocab=300, rank=40) if model == "tiny" else {k: MODELS[model][k] for k in ("hidden", "vocab",
                                                                                                  "rank")}
    args, kwargs = draft_head_inputs(rows, **m, dtype=DTYPE, device=DEVICE)
    fn = draft_head_triton if provider == "triton" else draft_head_reference
    if provider == "triton":
        same = (fn(*args, **kwargs)[0] == draft_head_reference(*args, **kwargs)[0]).float().mean().item()
        assert same > 0.95
    benchmark.group = f"draft_head {model} rows {rows}"
    timed(benchmark, lambda: fn(*args, **kwargs))


# ---- verification ----------------------------------------------------------------------------------------------------
VERIFY = [(v, b) for v in (49152, 151936) for b in (1, 16, 64)] if ON_GPU else [(70, 9)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("vocab,batch", VERIFY)
def bench_verify_sampling(benchmark, provider, vocab, batch):
    x = verify_inputs(batch, 15 if ON_GPU else 5, vocab, device=DEVICE)
    args = (x["draft_tokens"], x["num_drafts"], x["draft_probs"], x["target_probs"], x["uniforms"], x["race_noise"],
            x["kv_len"])
    fn = verify_sampling_triton if provider == "triton" else verify_sampling_reference
    if provider == "triton":
        assert all(torch.equal(a, b) for a, b in zip(fn(*args), verify_sampling_reference(*args)))
    benchmark.group = f"verify_sampling V{vocab} b{batch}"
    timed(benchmark, lambda: fn(*args))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 64] if ON_GPU else [9])
def bench_verify_greedy(benchmark, provider, batch):
    x = verify_inputs(batch, 15 if ON_GPU else 5, 1000, device=DEVICE)
    args = (x["draft_tokens"], x["num_drafts"], x["target_argmax"], x["kv_len"])
    fn = verify_greedy_triton if provider == "triton" else verify_greedy_reference
    if provider == "triton":
        assert all(torch.equal(a, b) for a, b in zip(fn(*args), verify_greedy_reference(*args)))
    benchmark.group = f"verify_greedy b{batch}"
    timed(benchmark, lambda: fn(*args))


# ---- few-row CPU products (compiled C, not Triton: a real measurement on any host) ---------------------------------
CPU_MATMUL = [(k, n, rows) for k, n in ((576, 3072), (576, 49152)) for rows in (1, 4, 16)]


@pytest.mark.skipif(not cpu_matmul.available(), reason=f"packed CPU matmul: {cpu_matmul.why_unavailable()}")
@pytest.mark.parametrize("provider", [f"{packing}-{name}" for packing in ("packed", "q4", "q8")
                                      for name in cpu_matmul.ISAS] + ["torch"])
@pytest.mark.parametrize("k,n,rows", CPU_MATMUL)
def bench_cpu_matmul(benchmark, provider, k, n, rows):
    """SmolLM2-135M's gate/up projection and lm_head at decode row counts (1 row, a verify block, a batch), in
    each variant this CPU runs (AVX2, AVX-512), from the fp32 packing and from GGUF blocks (the default model's
    layers are Q4_1, its lm_head Q8_0), and in torch."""
    gen = torch.Generator().manual_seed(rows)
    kind = provider.split("-", 1)[0]
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(k, n, generator=gen) if kind in ("packed", "torch") else gguf_weight(k, n, kind, gen)
    packed = cpu_matmul.pack(w) if kind in ("packed", "torch") else cpu_matmul.pack_blocks(w, kind)
    if provider != "torch":
        isa = cpu_matmul.ISAS[provider.split("-", 1)[1]]
        if isa.name not in cpu_matmul.runnable_isas():
            pytest.skip(f"this CPU does not run the {isa.name} variant")
        fn = lambda: cpu_matmul.few_rows_matmul(x, packed, isa=isa)  # noqa: E731
        torch.testing.assert_close(fn(), cpu_matmul.few_rows_matmul_reference(x, w), rtol=1e-4, atol=1e-3)
    else:
        fn = lambda: cpu_matmul.few_rows_matmul_reference(x, w)  # noqa: E731
    benchmark.group = f"cpu_matmul {k}x{n} rows {rows}"
    fn()
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)


# ---- a decode step's small row-wise ops (compiled C, as the products) ---------------------------------------------
def rowwise_case(op: str, rows: int):
    """(C op, its reference) on SmolLM2-135M's widths: hidden 576, 9 q + 3 kv heads of 64, a 1024-slot cache."""
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=gen) * 30, torch.randn(576, generator=gen)
    if op == "rms_norm":
        return (lambda: cpu_rowwise.rms_norm(x, w, 1e-5)), (lambda: cpu_rowwise.rms_norm_reference(x, w, 1e-5))
    if op == "add_rms_norm":
        return ((lambda: cpu_rowwise.add_rms_norm(x, x, w, 1e-5)),
                (lambda: cpu_rowwise.add_rms_norm_reference(x, x, w, 1e-5)))
    heads = torch.randn(1, rows, 15, 64, generator=gen)
    cos, sin = torch.randn(1, rows, 1, 64, generator=gen), torch.randn(1, rows, 1, 64, generator=gen)
    if op == "rope":
        return ((lambda: cpu_rowwise.rope(heads, 12, cos, sin)),
                (lambda: cpu_rowwise.rope_reference(heads, 12, cos, sin)))
    caches, slots = torch.zeros(2, 1, 3, 1024, 64), torch.arange(300, 300 + rows)[None]
    k, v = heads[:, :, 9:12], heads[:, :, 12:]
    return ((lambda: cpu_rowwise.write_kv(caches[0], caches[1], k, v, slots)),
            (lambda: cpu_rowwise.write_kv_reference(caches[0], caches[1], k, v, slots)))


@pytest.mark.skipif(not cpu_matmul.available(), reason=f"CPU kernels: {cpu_matmul.why_unavailable()}")
@pytest.mark.parametrize("provider", ["c", "torch"])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "rope", "write_kv"])
@pytest.mark.parametrize("rows", [1, 9])
def bench_cpu_rowwise(benchmark, provider, op, rows):
    """One call of each op at decode row counts (1 row, a 9-token verify tree); the references are the torch ops
    the model ran before (their cost in a decode loop is higher still: their code is evicted between products)."""
    fast, reference = rowwise_case(op, rows)
    fn = fast if provider == "c" else reference
    benchmark.group = f"cpu_rowwise {op} rows {rows}"
    fn()
    benchmark.pedantic(fn, rounds=200, iterations=10, warmup_rounds=5)


# ---- a decode step's attention on a CPU (compiled C) ------------------------------------------------------------------
@pytest.mark.skipif(not cpu_matmul.available(), reason=f"CPU kernels: {cpu_matmul.why_unavailable()}")
@pytest.mark.parametrize("provider", ["c", "torch"])
@pytest.mark.parametrize("mode,drafts", [("decode", 0), ("tree", 8), ("parallel", 3)])
def bench_cpu_attention(benchmark, provider, mode, drafts):
    """SmolLM2-135M's heads (9 q, 3 kv, 64), ~300 cached tokens, batch 1: one row, a 9-node verify tree, a
    parallel step's 4 tokens and 4 mask groups of 4. The reference gets its visibility mask ready-made, as a step
    builds it once for all layers."""
    m = MODELS["smollm2-135m"]
    x = attention_inputs(1, mode, head_dim=m["head_dim"], heads=m["heads"], kv_heads=m["kv_heads"], cache_len=300,
                         dtype=torch.float32, device="cpu", drafts=drafts, group_size=4)
    assert cpu_attention.takes_c_path(x["q"], x["k_cache"], x["v_cache"], x["kv_limit"], x["k_mask"], x["v_mask"],
                                      x.get("tree"))
    if provider == "c":
        fn = lambda: cpu_attention.block_attention(**x)   # noqa: E731
    else:
        extent, masks = int(x["kv_limit"].max()) + 1, 0 if x["k_mask"] is None else x["k_mask"].shape[1]
        allowed = visibility(x["kv_limit"], extent, x["num_clean"], masks, x["group_size"], x.get("tree"))
        fn = lambda: block_attention_reference(**x, kv_extent=extent, allowed=allowed)   # noqa: E731
    torch.testing.assert_close(fn(), block_attention_reference(**x), rtol=1e-5, atol=1e-5)
    benchmark.group = f"cpu_attention smollm2-135m {mode} b1"
    benchmark.pedantic(fn, rounds=200, iterations=10, warmup_rounds=5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-o", "python_functions=bench_*", *sys.argv[1:]]))
