"""kernels.cpu_matmul (the packed few-row product on an x86 CPU: fp32 rows, fp32, bf16 or GGUF-block weights)
against its reference ``x @ W``."""
from __future__ import annotations

import pytest
import torch
from kernel_utils import gguf_weight, poisoned_allocations, seeded

from kernels import cpu_matmul

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason=f"packed CPU matmul unavailable here: "
                                  f"{cpu_matmul.why_unavailable()}")


@needs_kernel
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", list(cpu_matmul.ISAS))
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 12, 13, 25, 40])
@pytest.mark.parametrize("k,n", [(37, 16), (50, 48), (576, 160), (129, 80)])
def test_matches_reference_at_odd_shapes(rows, k, n, threads, isa, weights):
    """Every row count takes a different pass function (1 .. max_rows, several tiles per pass for few rows, a
    partial last group of tiles); odd K and tile counts; outputs poisoned so an unwritten element fails. bf16
    weights widen exactly to fp32, so both weight dtypes meet an fp32 tolerance against their own values."""
    if isa not in cpu_matmul.runnable_isas():
        pytest.skip(f"this CPU does not run the {isa} variant")
    gen = seeded(rows * 1000 + k + n + threads)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(k, n, generator=gen).to(weights)
    with poisoned_allocations():
        out = cpu_matmul.few_rows_matmul(x, cpu_matmul.pack(w), threads=threads, isa=cpu_matmul.ISAS[isa])
    assert out.dtype == torch.float32
    expected = cpu_matmul.few_rows_matmul_reference(x.double(), w.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_kernel
def test_out_in_layout_and_leading_dims():
    gen = seeded(1)
    x, w_out_in = torch.randn(2, 3, 64, generator=gen), torch.randn(96, 64, generator=gen)
    out = cpu_matmul.few_rows_matmul(x, cpu_matmul.pack(w_out_in, "out_in"))
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, x @ w_out_in.t(), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 7, 20])
def test_a_row_does_not_depend_on_its_batch(rows, weights):
    """Each output is one in-order sum over k, whatever shares the call: a verify pass gives the bonus the very
    logits a one-row decode step gives it."""
    gen = seeded(rows)
    x = torch.randn(rows, 200, generator=gen)
    packed = cpu_matmul.pack(torch.randn(200, 112, generator=gen).to(weights))
    together = cpu_matmul.few_rows_matmul(x, packed)
    for i in range(rows):
        assert torch.equal(together[i], cpu_matmul.few_rows_matmul(x[i:i + 1], packed)[0])


@needs_kernel
@pytest.mark.skipif(len(cpu_matmul.runnable_isas()) < 2, reason="one variant runs on this CPU")
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 29])
def test_every_variant_gives_the_same_bits(rows, weights):
    """The AVX2 and AVX-512 variants run the same in-order FMA chain per output: a model decodes the same tokens
    whichever this CPU picks."""
    gen = seeded(rows + 7)
    x = torch.randn(rows, 333, generator=gen)
    packed = cpu_matmul.pack(torch.randn(333, 208, generator=gen).to(weights))
    outs = [cpu_matmul.few_rows_matmul(x, packed, isa=cpu_matmul.ISAS[name])
            for name in cpu_matmul.runnable_isas()]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 13])
def test_fp32_weights_of_bf16_values_pack_as_bf16_with_the_same_bits(rows):
    """A drafter's projectors are bf16 values held in fp32: packed as bf16 they stream half the bytes and give the
    very bits the fp32 packing gives; one value off the bf16 grid keeps a weight fp32."""
    gen = seeded(rows + 70)
    x, w = torch.randn(rows, 150, generator=gen), torch.randn(150, 64, generator=gen).bfloat16().float()
    packed = cpu_matmul.pack(w)
    assert packed.dtype == torch.bfloat16
    as_fp32 = w.reshape(150, 4, cpu_matmul.TILE).permute(1, 0, 2).contiguous()   # pack's layout, kept fp32
    assert torch.equal(cpu_matmul.few_rows_matmul(x, packed), cpu_matmul.few_rows_matmul(x, as_fp32))
    w[7, 3] += 1e-4
    assert cpu_matmul.pack(w).dtype == torch.float32


@needs_kernel
@pytest.mark.parametrize("rows", [3, cpu_matmul.BF16_MAX_ROWS + 5])
def test_linear_takes_bf16_weights_and_keeps_the_rows_dtype(rows):
    """The draft head's bf16 products: few rows run in the kernel (bf16 weights streamed, fp32 sums), more rows in
    torch's bf16 GEMM; either way ``linear`` returns the rows' dtype and the same product within bf16 rounding."""
    gen = seeded(rows)
    x, w = torch.randn(rows, 96, generator=gen).bfloat16(), torch.randn(48, 96, generator=gen).bfloat16()
    assert cpu_matmul.takes_packed_path(x, w, 48) == (rows <= cpu_matmul.BF16_MAX_ROWS)
    out = cpu_matmul.linear(x, w, layout="out_in")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), x.double() @ w.double().t(), rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("isa", list(cpu_matmul.ISAS))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 12, 13, 27])
@pytest.mark.parametrize("k,n", [(32, 16), (96, 48), (576, 80), (1536, 64)])
def test_gguf_block_packings_give_the_fp32_packings_bits(rows, k, n, isa, kind):
    """Weights that are dequantised Q4_1 / Q8_0 blocks pack as those blocks (5x / 3.5x fewer bytes); the kernel
    rebuilds every weight with the dequantisation's own arithmetic, so each output is the fp32 packing's very bits.
    Outputs poisoned; every row count (several tiles per pass for few rows, a partial last group of tiles)."""
    if isa not in cpu_matmul.runnable_isas():
        pytest.skip(f"this CPU does not run the {isa} variant")
    gen = seeded(rows * 100 + k + n)
    w, x = gguf_weight(k, n, kind, gen), torch.randn(rows, k, generator=gen)
    packed = cpu_matmul.pack_blocks(w, kind)
    assert packed is not None and cpu_matmul.WEIGHT_DTYPES[packed.dtype] == kind
    assert packed.numel() == n * k * cpu_matmul.BLOCK_BYTES[kind] // (32 * 16)
    assert torch.equal(cpu_matmul.unpack_blocks(packed), w)
    with poisoned_allocations():
        out = cpu_matmul.few_rows_matmul(x, packed, isa=cpu_matmul.ISAS[isa])
        fp32 = cpu_matmul.few_rows_matmul(x, cpu_matmul.pack(w), isa=cpu_matmul.ISAS[isa])
    assert torch.equal(out, fp32)
    torch.testing.assert_close(out.double(), cpu_matmul.few_rows_matmul_reference(x.double(), w.double()),
                               rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_only_weights_that_are_gguf_blocks_pack_as_blocks():
    gen = seeded(3)
    q4, q8 = gguf_weight(64, 32, "q4", gen), gguf_weight(64, 32, "q8", gen)
    assert cpu_matmul.block_values(q4, "q8") is None and cpu_matmul.block_values(q8, "q4") is None
    assert cpu_matmul.block_values(torch.randn(64, 32, generator=gen), "q4") is None
    assert cpu_matmul.block_values(torch.randn(64, 32, generator=gen), "q8") is None
    assert cpu_matmul.block_values(q4[:48], "q4") is None                   # K not whole blocks
    nudged = q4.clone()
    nudged[40, 7] = torch.nextafter(nudged[40, 7], torch.tensor(1.0))      # one value off the grid
    assert cpu_matmul.block_values(nudged, "q4") is None
    assert cpu_matmul.pack_blocks(q4.t().contiguous(), "q4", "out_in") is not None   # an lm_head's layout


@needs_kernel
@pytest.mark.parametrize("rows", [1, cpu_matmul.BLOCKS_MAX_ROWS, cpu_matmul.BLOCKS_MAX_ROWS + 1])
def test_linear_takes_the_block_packing_for_few_rows_with_the_same_bits(rows, monkeypatch):
    gen = seeded(rows + 11)
    w, x = gguf_weight(96, 48, "q4", gen), torch.randn(rows, 96, generator=gen)
    monkeypatch.setattr(cpu_matmul, "USE_BLOCKS", False)
    fp32 = cpu_matmul.linear(x, w)
    assert not hasattr(w, "_packed_blocks")
    monkeypatch.setattr(cpu_matmul, "USE_BLOCKS", True)
    assert torch.equal(cpu_matmul.linear(x, w), fp32)
    assert hasattr(w, "_packed_blocks") == (rows <= cpu_matmul.BLOCKS_MAX_ROWS)


def test_a_variant_can_be_asked_for_by_name(monkeypatch):
    monkeypatch.setenv("FLEXDRAFT_CPU_MATMUL_ISA", "avx2")
    if "avx2" in cpu_matmul.runnable_isas():
        assert cpu_matmul.chosen_isa().name == "avx2"
    monkeypatch.setenv("FLEXDRAFT_CPU_MATMUL_ISA", "sse9")
    with pytest.raises(RuntimeError, match="must be one of avx2, avx512"):
        cpu_matmul.chosen_isa()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_matmul.pack(torch.randn(8, 20))
    with pytest.raises(ValueError, match="layout"):
        cpu_matmul.pack(torch.randn(8, 16), "rows")
    if cpu_matmul.available():
        with pytest.raises(ValueError, match="K = 8"):
            cpu_matmul.few_rows_matmul(torch.randn(2, 9), cpu_matmul.pack(torch.randn(8, 16)))


def test_turned_off_it_says_why(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "ISA", None)
    monkeypatch.setattr(cpu_matmul, "_WHY_NOT", None)
    monkeypatch.setenv("FLEXDRAFT_CPU_MATMUL", "0")
    assert not cpu_matmul.available()
    assert "FLEXDRAFT_CPU_MATMUL=0" in cpu_matmul.why_unavailable()
