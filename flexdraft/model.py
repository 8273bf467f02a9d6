"""Our compact Llama-family forward pass (Llama, Qwen2, Qwen3) over Hugging Face weights, with a static KV cache.

One step processes, for every sequence of a padded batch, some *clean* tokens (real tokens of the sequence, through
all layers with the frozen target weights) and optionally *mask* tokens (FlexDraft drafts: they enter at the
drafter's split layer and use the drafter's own attention projections; see ``flexdraft/drafter.py``).
All attention goes through ``kernels.block_attention``, whose visibility comes from index rules.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexdraft.config import ModelConfig, rope_frequencies
from flexdraft.errors import FlexDraftError
from kernels.block_attention import block_attention, step_arguments
from kernels.cpu_matmul import linear
from kernels.cpu_rowwise import add_rms_norm, rms_norm, rope, write_kv


class KVCache:
    """Static cache ``[layers, batch, kv_heads, max_len, head_dim]`` plus a length per sequence.

    Writing a token writes at its position; rolling back rejected tokens is not advancing ``lengths``
    (whatever lies past a sequence's length is garbage that later steps overwrite).
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v: [B, T, Hkv, D] at positions [B, T]."""
        write_kv(self.k[layer], self.v[layer], k, v, positions)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished sequences from the batch (one copy per finish event, not per step)."""
        self.k, self.v, self.lengths = self.k[:, rows], self.v[:, rows], self.lengths[rows]


@dataclass
class MaskStream:
    """The mask tokens of a step: ``groups`` groups of ``group_size`` per sequence.

    positions [B, Tm]: where each mask stands; anchors [B, Tm]: the last cache slot its group may see; tree [B, Tm]
    (a tree step): the ancestor bitmask of the node its group is anchored at.
    """
    positions: torch.Tensor
    anchors: torch.Tensor
    group_size: int
    tree: torch.Tensor | None = None


class AttentionWeights(nn.Module):
    """The projectors of one attention: the target's, or a drafter's trainable copy. Weights are [in, out]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        qkv_out = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.wqkv = nn.Parameter(torch.empty(c.hidden_size, qkv_out), requires_grad=False)
        self.bqkv = nn.Parameter(torch.empty(qkv_out), requires_grad=False) if c.qkv_bias else None
        self.wo = nn.Parameter(torch.empty(c.num_heads * c.head_dim, c.hidden_size), requires_grad=False)
        self.q_norm = nn.Parameter(torch.empty(c.head_dim), requires_grad=False) if c.qk_norm else None
        self.k_norm = nn.Parameter(torch.empty(c.head_dim), requires_grad=False) if c.qk_norm else None
        self.eps = c.rms_norm_eps

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, h] -> the q, k and v heads side by side [B, T, Hq + 2 Hkv, D], qk-norm applied, RoPE not."""
        B, T, _ = x.shape
        qkv = linear(x, self.wqkv, self.bqkv).view(B, T, -1, self.head_dim)
        if self.q_norm is None:
            return qkv
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        return torch.cat([rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps), v], dim=2)

    def split_rotated(self, heads: torch.Tensor, cos, signed_sin):
        """[B, T, Hq + 2 Hkv, D] heads -> q [B, T, Hq, D], k and v [B, T, Hkv, D]; q and k rotated in one call."""
        qk = rope(heads, self.num_heads + self.num_kv_heads, cos, signed_sin)
        return qk[:, :, :self.num_heads], qk[:, :, self.num_heads:], heads[:, :, self.num_heads + self.num_kv_heads:]

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        return linear(attn.flatten(2), self.wo)


class Layer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.attn = AttentionWeights(config)
        self.attn_norm = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)
        self.mlp_norm = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)
        self.w_gate_up = nn.Parameter(torch.empty(c.hidden_size, 2 * c.intermediate_size), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(c.intermediate_size, c.hidden_size), requires_grad=False)
        self.eps = c.rms_norm_eps

    def mlp(self, normed: torch.Tensor) -> torch.Tensor:
        """The MLP of the residual stream already normed with ``mlp_norm`` (``add_rms_norm`` after attention)."""
        gate, up = linear(normed, self.w_gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w_down)


class Transformer(nn.Module):
    """The target model. Its weights are frozen; nothing here is trained."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.norm = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)
        self.untied_lm_head = None if c.tie_word_embeddings else nn.Parameter(
            torch.empty(c.vocab_size, c.hidden_size), requires_grad=False)
        self.fingerprint: str | None = None  # set by load_model from the fp32 weights
        inv_freq, self.rope_scale = rope_frequencies(c)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_table = None

    # ---- helpers -------------------------------------------------------------------------------------------------
    @property
    def lm_head(self) -> torch.Tensor:
        return self.embed if self.untied_lm_head is None else self.untied_lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    def rope(self, positions: torch.Tensor):
        """cos, signed sin (see ``kernels.cpu_rowwise.rope_reference``) [B, T, 1, D] for positions [B, T], from a
        table grown on demand."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self._rope_table is None or self._rope_table[0].shape[0] < need:
            length = max(need, 2 * (0 if self._rope_table is None else self._rope_table[0].shape[0]), 1024)
            angles = torch.arange(length, dtype=torch.float64, device=self.device)[:, None] * self.inv_freq[None]
            angles = torch.cat([angles, angles], dim=-1)
            signed_sin = angles.sin()
            signed_sin[:, : signed_sin.shape[1] // 2] *= -1
            self._rope_table = ((angles.cos() * self.rope_scale).to(self.dtype),
                                (signed_sin * self.rope_scale).to(self.dtype))
        cos, signed_sin = self._rope_table
        return cos[positions][:, :, None], signed_sin[positions][:, :, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head, only for the rows that need logits."""
        normed = rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        return linear(normed, self.lm_head, layout="out_in")

    # ---- the forward pass ----------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                masks: MaskStream | None = None, drafter=None, stop_layer: int | None = None,
                start: tuple[int, torch.Tensor] | None = None,
                tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one step; returns the final hidden states of the clean tokens [B, Tc, h] and of the masks [B, Tm, h].
        ``stop_layer`` returns the residual stream entering that layer instead; ``start = (layer, hidden [B, Tc, h])``
        resumes the clean tokens from such a stored stream (training stores it once: the first layers never change).

        tokens, positions [B, Tc]: clean tokens (Tc may be 0: a draft-only pass starts at the split layer).
        Their K/V are written into the cache at their positions before attending, so causality is ``kv <= position``.
        ``tree = (slots, bitmasks)`` [B, Tc] each (a tree step: its nodes share positions, not slots) writes them at
        ``slots`` instead, and each sees, of the step's own slots, only its ancestors (``kernels.block_attention``).
        """
        num_clean = tokens.shape[1]
        if start is not None:
            first, hidden = start
        else:
            first = drafter.split_layer if (num_clean == 0 and drafter is not None) else 0
            hidden = self.embed[tokens] if num_clean else None
        # What every layer of the step shares is built once here: RoPE tables, attention limits, and (where the
        # reference attention runs) the visibility mask.
        cos, sin = self.rope(positions) if num_clean else (None, None)
        clean_limits, clean_tree = (positions, None) if tree is None else tree
        shape = {"dtype": self.dtype, "head_dim": self.config.head_dim}
        clean_step = step_arguments(clean_limits, num_clean, tree=clean_tree, **shape) if num_clean else None
        if masks is not None:   # the tuned layers' queries: the clean tokens, then the masks
            cos_tuned, sin_tuned = self.rope(masks.positions)
            tuned_limits, tuned_tree = masks.anchors, masks.tree
            if num_clean:
                cos_tuned, sin_tuned = torch.cat([cos, cos_tuned], dim=1), torch.cat([sin, sin_tuned], dim=1)
                tuned_limits = torch.cat([clean_limits, tuned_limits], dim=1)
                tuned_tree = None if clean_tree is None else torch.cat([clean_tree, masks.tree], dim=1)
            tuned_step = step_arguments(tuned_limits, num_clean, masks.group_size, tuned_tree, **shape)
        for index in range(first, len(self.layers) if stop_layer is None else stop_layer):
            layer = self.layers[index]
            if masks is not None and index == drafter.split_layer:
                mask_hidden = drafter.mask_embedding.to(self.dtype).expand(positions.shape[0], masks.positions.shape[1], -1)
                hidden = mask_hidden if hidden is None else torch.cat([hidden, mask_hidden], dim=1)
            tuned = masks is not None and index >= drafter.split_layer
            x = rms_norm(hidden, layer.attn_norm, layer.eps)
            if tuned:
                # Clean rows project with the target's weights, masks with the drafter's; one RoPE call for both.
                draft_attn = drafter.attention(index)
                heads = draft_attn.heads(x[:, num_clean:])
                if num_clean:
                    heads = torch.cat([layer.attn.heads(x[:, :num_clean]), heads], dim=1)
                q, k, v = layer.attn.split_rotated(heads, cos_tuned, sin_tuned)
                k, k_mask, v, v_mask = k[:, :num_clean], k[:, num_clean:], v[:, :num_clean], v[:, num_clean:]
                step = tuned_step
            else:
                q, k, v = layer.attn.split_rotated(layer.attn.heads(x), cos, sin)
                k_mask = v_mask = None
                step = clean_step
            if num_clean:
                cache.write(index, k, v, clean_limits)
            attn = block_attention(q, cache.k[index], cache.v[index], k_mask=k_mask, v_mask=v_mask, **step)
            if tuned:
                out = layer.attn.output(attn[:, :num_clean]) if num_clean else None
                out_mask = draft_attn.output(attn[:, num_clean:])
                out = out_mask if out is None else torch.cat([out, out_mask], dim=1)
            else:
                out = layer.attn.output(attn)
            hidden, normed = add_rms_norm(hidden, out, layer.mlp_norm, layer.eps)
            hidden = hidden + layer.mlp(normed)
        if masks is None:
            return hidden, None
        return hidden[:, :num_clean], hidden[:, num_clean:]


# ---- loading -------------------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FlexDraftError(f"no *.safetensors weights in {path} (flexdraft never unpickles .bin checkpoints)")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as exc:  # safetensors raises several types for truncated or garbled files
            raise FlexDraftError(f"corrupt weights file {file}: {exc}") from None
    return tensors


def load_weights(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Copy Hugging Face tensors into our layout: q/k/v and gate/up fused, projections [in, out]."""
    def take(name):
        for key in (name, "model." + name):
            if key in tensors:
                return tensors[key].float()
        raise FlexDraftError(f"checkpoint lacks tensor {name!r}")

    c = model.config
    with torch.no_grad():
        model.embed.copy_(take("embed_tokens.weight"))
        model.norm.copy_(take("norm.weight"))
        if not c.tie_word_embeddings:
            model.lm_head.copy_(tensors["lm_head.weight"].float() if "lm_head.weight" in tensors else take("embed_tokens.weight"))
        for i, layer in enumerate(model.layers):
            p = f"layers.{i}."
            a = layer.attn
            a.wqkv.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]).t())
            if a.bqkv is not None:
                a.bqkv.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
            a.wo.copy_(take(p + "self_attn.o_proj.weight").t())
            if a.q_norm is not None:
                a.q_norm.copy_(take(p + "self_attn.q_norm.weight"))
                a.k_norm.copy_(take(p + "self_attn.k_norm.weight"))
            layer.attn_norm.copy_(take(p + "input_layernorm.weight"))
            layer.mlp_norm.copy_(take(p + "post_attention_layernorm.weight"))
            layer.w_gate_up.copy_(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]).t())
            layer.w_down.copy_(take(p + "mlp.down_proj.weight").t())


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    path = Path(path)
    if not path.is_dir():
        raise FlexDraftError(f"model directory {path} does not exist")
    config = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    model.inv_freq = rope_frequencies(config)[0]
    load_weights(model, _read_safetensors(path))
    model.fingerprint = weights_fingerprint(model)  # before the dtype cast, so it names the weights, not the dtype
    return model.to(device=device, dtype=dtype).eval()


def weights_fingerprint(model: Transformer) -> str:
    """A short hash of the target's weights: a drafter records it so it is never paired with another target."""
    import hashlib

    h = hashlib.sha256()
    # Projections are sampled in Hugging Face's [out, in] order, so the hash does not depend on our storage layout.
    for tensor in (model.embed, model.layers[0].attn.wqkv.t(), model.layers[-1].w_down.t(), model.norm):
        sample = tensor.detach().flatten()[:: max(1, tensor.numel() // 4096)].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(model: Transformer, path: Path | None = None) -> dict:
    c = model.config
    return {"model_type": c.model_type, "num_layers": c.num_layers, "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
            "weights_sha": model.fingerprint or weights_fingerprint(model)}
