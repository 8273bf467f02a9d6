"""Model configuration read from a Hugging Face ``config.json`` (Llama, Qwen2 and Qwen3 families)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from flexdraft.errors import FlexDraftError

SUPPORTED = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict, hash=False, compare=False)
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED:
            raise FlexDraftError(f"unsupported architecture {model_type!r}: flexdraft runs {', '.join(SUPPORTED)} models")
        # transformers 5 writes rope settings under rope_parameters; older versions use rope_theta / rope_scaling.
        rope = dict(raw.get("rope_parameters") or {})
        scaling = dict(raw.get("rope_scaling") or {})
        rope.update(scaling)
        theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = raw.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        heads = raw["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            rope_theta=theta,
            rope_scaling={k: v for k, v in rope.items() if k not in ("rope_theta",)} | {"rope_type": rope_type},
            eos_token_ids=eos,
        )

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads((Path(path) / "config.json").read_text())
        except FileNotFoundError:
            raise FlexDraftError(f"no config.json in {path}: pass a Hugging Face checkpoint directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FlexDraftError(f"corrupt config.json in {path}: {exc}") from None
        try:
            return cls.from_dict(raw)
        except KeyError as exc:
            raise FlexDraftError(f"config.json in {path} lacks {exc.args[0]!r}") from None


def rope_frequencies(config: ModelConfig) -> tuple["torch.Tensor", float]:
    """Inverse frequencies and the attention scaling of cos/sin, for the rope kinds Llama 3 and Qwen use."""
    import torch

    dim = config.head_dim
    base = config.rope_theta
    # Made on the CPU even under load_model's meta device (both aranges): a meta arange imports torch._dynamo,
    # ~1.4 s of every process's start.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    scaling = config.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        factor = scaling["factor"]
        old_len = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
        mscale = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

        def correction_dim(rotations):
            return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low = correction_dim(beta_fast)
        high = correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(mscale)
    raise FlexDraftError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, yarn)")
