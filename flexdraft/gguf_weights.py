"""A llama GGUF's weights as Hugging Face fp32 tensors, read with numpy alone (no `gguf` package, no transformers).

Why: the default model ships as a 98 MB Q4_1 GGUF, four times smaller than its fp32 safetensors. A machine that has
neither the `gguf` package nor room to receive 538 MB (the lent GPU machine: 64 MiB per call) can take the GGUF in
parts and rebuild the very same fp32 weights there. "The very same" is checked, not assumed: the dequantisation
follows gguf-py's arithmetic (fp32, multiply then add) and the q/k row order transformers restores, so the rebuilt
target has the fingerprint a drafter records (``tests/test_gguf_weights.py`` compares every tensor).

Covers what the default model holds: F32, F16, Q8_0 and Q4_1 tensors of a ``llama`` GGUF, version 2 or 3.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from flexdraft.errors import FlexDraftError

MAGIC = b"GGUF"
BLOCK = 32   # weights per quantised block (Q8_0, Q4_1)
# GGUF's metadata value types: id -> struct format (8: string, 9: array, handled apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


class _Cursor:
    def __init__(self, data: memoryview):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        text = bytes(self.data[self.at: self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return text

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("<I"), self.take("<Q")
            return [self.value(item) for _ in range(count)]
        if kind not in SCALARS:
            raise FlexDraftError(f"unknown GGUF metadata type {kind}")
        return self.take(SCALARS[kind])


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[int, tuple[int, ...], np.ndarray]]]:
    """(metadata, {name: (type, numpy shape, raw bytes)}) of a GGUF file; shapes in row-major order."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(raw))
    try:
        if bytes(raw[:4]) != MAGIC:
            raise FlexDraftError(f"{path} is not a GGUF file")
        cursor.at = 4
        version, n_tensors, n_meta = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
        if version not in (2, 3):
            raise FlexDraftError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        meta = {}
        for _ in range(n_meta):
            key = cursor.string()
            meta[key] = cursor.value(cursor.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = cursor.string(), cursor.take("<I")
            dims = [cursor.take("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), cursor.take("<I"), cursor.take("<Q")))
    except struct.error:
        raise FlexDraftError(f"{path} is truncated or corrupt") from None
    alignment = int(meta.get("general.alignment", 32))
    start = -(-cursor.at // alignment) * alignment
    tensors = {}
    for name, shape, kind, offset in infos:
        count = int(np.prod(shape))
        size = {F32: 4 * count, F16: 2 * count, Q8_0: count // BLOCK * 34, Q4_1: count // BLOCK * 20}.get(kind)
        if size is None:
            raise FlexDraftError(f"{path}: tensor {name} has GGUF type {kind}, which this reader does not cover")
        if start + offset + size > len(raw):
            raise FlexDraftError(f"{path} is truncated or corrupt (tensor {name} runs past the end)")
        tensors[name] = (kind, shape, raw[start + offset: start + offset + size])
    return meta, tensors


def dequantize(kind: int, shape: tuple[int, ...], data: np.ndarray) -> np.ndarray:
    """fp32 values, computed as gguf-py does (fp16 scales widened to fp32, then ``d * q (+ m)``)."""
    if kind == F32:
        return data.view(np.float32).reshape(shape).copy()
    if kind == F16:
        return data.view(np.float16).astype(np.float32).reshape(shape)
    if kind == Q8_0:   # per block: fp16 d, 32 int8 q
        blocks = data.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if kind == Q4_1:   # per block: fp16 d, fp16 m, 16 bytes: weights 0-15 in the low nibbles, 16-31 in the high
        blocks = data.reshape(-1, 20)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        packed = blocks[:, 4:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(shape)
    raise FlexDraftError(f"GGUF type {kind} is not covered")


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves in q/k rows; transformers' order puts them back."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The GGUF's weights under Hugging Face llama names, fp32 (tied embeddings: no ``lm_head``)."""
    meta, tensors = read_gguf(Path(path))
    if meta.get("general.architecture") != "llama":
        raise FlexDraftError(f"{path}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    out = {}
    for name, (kind, shape, data) in tensors.items():
        w = dequantize(kind, shape, data)
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, layer, part, _ = name.split(".")
            if part not in HF_NAMES:
                raise FlexDraftError(f"{path}: unexpected tensor {name}")
            if part in ("attn_q", "attn_k"):
                w = unpermute_rope_rows(w, heads if part == "attn_q" else kv_heads)
            key = f"model.layers.{layer}.{HF_NAMES[part]}.weight"
        else:
            raise FlexDraftError(f"{path}: unexpected tensor {name}")
        out[key] = torch.from_numpy(np.ascontiguousarray(w))
    return out
