"""The FlexDraft drafter: the target's own last L layers with trainable copies of their attention projectors.

Mask tokens enter at ``split_layer = N - L`` as ``mask_embedding`` and, in the tuned layers, use this module's
projectors; the MLPs, norms and ``lm_head`` stay the target's, shared and frozen. The bonus-guided calibration MLP
(``Linear(2h -> r) -> SiLU -> Linear(r -> vocab)``) corrects the draft logits with the resolved bonus token.

A drafter may draft from a *draft vocabulary*: the most frequent tokens of its training corpus (EAGLE-3 and FR-Spec
do the same). Its head then reads only those rows of ``lm_head`` and its calibration MLP outputs only those words,
which makes the head several times cheaper to run and to train and the checkpoint smaller. Verification still runs
over the target's whole vocabulary, so nothing about losslessness changes: a token outside the draft vocabulary is
simply never proposed (q = 0 there), and speculative sampling's residual max(p - q, 0) covers it exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from flexdraft.errors import FlexDraftError
from flexdraft.model import AttentionWeights, Transformer, model_identity

WEIGHTS_FILE, CONFIG_FILE = "drafter.safetensors", "drafter.json"


@contextmanager
def atomic_directory(path: str | Path):
    """Write a directory's files into a temporary sibling, then swap it into place with renames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
        os.replace(path, old / "d")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@dataclass
class DrafterConfig:
    num_tuned_layers: int
    block_size: int = 16
    calibration_rank: int = 256
    target: dict = field(default_factory=dict)  # the identity of the target it was trained for
    draft_vocab_size: int | None = None         # None: draft from the target's whole vocabulary

    @staticmethod
    def default_tuned_layers(num_layers: int) -> int:
        return max(1, round(0.28 * num_layers))  # the release tunes 10 of 36 layers


def calibration_input_weights(rank: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Random input weights for calibration units, scaled to the input width (their output weights start at zero)."""
    return torch.randn(rank, width, generator=generator) / width ** 0.5


class Drafter(nn.Module):
    def __init__(self, target: Transformer, config: DrafterConfig):
        super().__init__()
        c = target.config
        if not 1 <= config.num_tuned_layers <= c.num_layers:
            raise FlexDraftError(f"num_tuned_layers must be in [1, {c.num_layers}], got {config.num_tuned_layers}")
        if config.block_size < 2:
            raise FlexDraftError(f"block size must be at least 2, got {config.block_size}")
        self.config = config
        self.split_layer = c.num_layers - config.num_tuned_layers
        self.block_size = config.block_size
        self.mask_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.tuned = nn.ModuleList(AttentionWeights(c) for _ in range(config.num_tuned_layers))
        for attn in self.tuned:
            for p in attn.parameters():
                p.requires_grad_(True)
        r, h, v = config.calibration_rank, c.hidden_size, config.draft_vocab_size or c.vocab_size
        if not 1 <= v <= c.vocab_size:
            raise FlexDraftError(f"draft vocabulary size must be in [1, {c.vocab_size}], got {v}")
        self.target_vocab_size = c.vocab_size
        # The target's token ids the head drafts from, ascending (None: all of them, in the target's order).
        self.register_buffer("draft_vocab", torch.arange(v) if config.draft_vocab_size else None)
        self.calib_w1 = nn.Parameter(torch.zeros(r, 2 * h))
        self.calib_b1 = nn.Parameter(torch.zeros(r))
        self.calib_w2 = nn.Parameter(torch.zeros(v, r))
        self.calib_b2 = nn.Parameter(torch.zeros(v))

    def attention(self, layer_index: int) -> AttentionWeights:
        return self.tuned[layer_index - self.split_layer]

    @property
    def calibration(self):
        return self.calib_w1, self.calib_b1, self.calib_w2, self.calib_b2

    # ---- the draft vocabulary -------------------------------------------------------------------------------------
    def vocab_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of a [V, ...] target matrix (``lm_head``) that the head drafts from."""
        return weight if self.draft_vocab is None else weight[self.draft_vocab]

    def target_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> the target's token ids."""
        return indices if self.draft_vocab is None else self.draft_vocab[indices]

    def draft_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The target's token ids -> draft-vocabulary indices, -1 for a token the head cannot draft."""
        if self.draft_vocab is None:
            return token_ids
        lookup = torch.full((self.target_vocab_size,), -1, dtype=torch.int64, device=token_ids.device)
        lookup[self.draft_vocab] = torch.arange(len(self.draft_vocab), device=token_ids.device)
        return lookup[token_ids]

    def on_target_vocab(self, probs: torch.Tensor) -> torch.Tensor:
        """q over the draft vocabulary [..., Vd] -> over the target's [..., V], zero where the head cannot draft."""
        if self.draft_vocab is None:
            return probs
        full = probs.new_zeros(*probs.shape[:-1], self.target_vocab_size)
        return full.index_copy_(-1, self.draft_vocab, probs)

    def head_dtype(self, target: Transformer) -> torch.dtype:
        """The dtype the engine's draft head computes in: bf16 on a CPU with an fp32 target and the torch backend,
        the target's own elsewhere. Drafts are only proposals that verification checks exactly, so their precision
        cannot change the output, and a CPU with native bf16 GEMMs runs the head's few-row vocabulary products 3-8x
        faster than fp32 (measured on an AVX512-BF16 host: 15 slots x 49152 words, fp32 ~35 ms, bf16 ~8 ms). On a CPU
        without them (AVX2 only) bf16 is the slow path, so the head stays fp32 there."""
        from kernels import backend

        if (target.device.type == "cpu" and target.dtype == torch.float32 and not backend.use_triton()
                and backend.cpu_bf16_is_fast()):
            return torch.bfloat16
        return target.dtype

    def head_weights(self, target: Transformer):
        """(lm_head rows of the draft vocabulary, calibration) for the engine's draft head, in ``head_dtype``:
        copies where they differ from the target's, made once and remade when a weight changes in place (an
        optimizer step, a load)."""
        dtype = self.head_dtype(target)
        if dtype == target.dtype and self.draft_vocab is None:
            return target.lm_head, self.calibration
        sources = (target.lm_head, *self.calibration) + (() if self.draft_vocab is None else (self.draft_vocab,))
        versions = tuple((id(w), w.data_ptr(), w._version) for w in sources)
        if getattr(self, "_head_versions", None) != versions:
            self._head_copies = tuple(w.detach().to(dtype) for w in (self.vocab_rows(target.lm_head), *self.calibration))
            self._head_versions = versions
        return self._head_copies[0], self._head_copies[1:]

    # ---- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def initialise(cls, target: Transformer, num_tuned_layers: int | None = None, block_size: int = 16,
                   calibration_rank: int = 256, seed: int = 0, draft_vocab: list[int] | None = None) -> "Drafter":
        """A fresh drafter: projector copies equal the target's; calibration starts as a no-op (zero output layer).
        ``draft_vocab``: the target token ids to draft from (None: all)."""
        tuned = num_tuned_layers or DrafterConfig.default_tuned_layers(target.config.num_layers)
        vocab = None if draft_vocab is None else sorted(set(int(t) for t in draft_vocab))
        config = DrafterConfig(tuned, block_size, calibration_rank, model_identity(target),
                               None if vocab is None else len(vocab))
        drafter = cls(target, config).to(device=target.device, dtype=target.dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if vocab is not None:
                drafter.draft_vocab.copy_(torch.tensor(vocab))
            for i, attn in enumerate(drafter.tuned):
                attn.load_state_dict(target.layers[drafter.split_layer + i].attn.state_dict())
            # A mask vector at the scale of the residual stream (a tiny one leaves masks a thousand times too small).
            scale = target.embed.float().norm(dim=1).mean() * 4
            direction = torch.randn(target.config.hidden_size, generator=generator).to(scale.device)   # CPU RNG: same on every device
            drafter.mask_embedding.copy_(direction / direction.norm() * scale)
            drafter.calib_w1.copy_(calibration_input_weights(*drafter.calib_w1.shape, generator))
        return drafter

    def widen_calibration(self, rank: int, seed: int = 0) -> None:
        """Grow the calibration MLP to ``rank`` hidden units without changing what it computes: the new units get
        random input weights (drawn as ``initialise`` draws them) and zero output weights, so training starts from
        the drafter as it was."""
        old = self.config.calibration_rank
        if rank <= old:
            return
        generator = torch.Generator().manual_seed(seed)
        extra_w1 = calibration_input_weights(rank - old, self.calib_w1.shape[1], generator)
        like = dict(device=self.calib_w1.device, dtype=self.calib_w1.dtype)
        with torch.no_grad():
            self.calib_w1 = nn.Parameter(torch.cat([self.calib_w1, extra_w1.to(**like)]))
            self.calib_b1 = nn.Parameter(torch.cat([self.calib_b1, torch.zeros(rank - old, **like)]))
            self.calib_w2 = nn.Parameter(torch.cat([self.calib_w2, torch.zeros(self.calib_w2.shape[0], rank - old, **like)], 1))
        self.config = replace(self.config, calibration_rank=rank)

    def deepen(self, target: Transformer, num_tuned_layers: int) -> None:
        """Tune ``num_tuned_layers`` of the target's layers, adding the layers below the split: their projector copies
        start as the target's own, and ``mask_embedding`` enters at the lower split unchanged. The residual stream
        carries a vector of its scale through a few layers largely intact, so the trained layers above still see
        roughly the masks they learnt on, and training resumes near the drafter's old function, not from scratch."""
        extra = num_tuned_layers - self.config.num_tuned_layers
        if extra <= 0:
            return
        if num_tuned_layers > target.config.num_layers:
            raise FlexDraftError(f"num_tuned_layers must be in [1, {target.config.num_layers}], got {num_tuned_layers}")
        self.split_layer -= extra
        added = [AttentionWeights(target.config) for _ in range(extra)]
        for i, attn in enumerate(added):
            attn.load_state_dict(target.layers[self.split_layer + i].attn.state_dict())
        like = dict(device=self.mask_embedding.device, dtype=self.mask_embedding.dtype)
        self.tuned = nn.ModuleList([*(a.to(**like) for a in added), *self.tuned])
        self.config = replace(self.config, num_tuned_layers=num_tuned_layers)

    def save(self, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write safetensors + JSON atomically: an interrupt never leaves half a drafter."""
        from safetensors.torch import save_file

        with atomic_directory(path) as tmp:
            tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.to(torch.int32)).contiguous()
                       for k, v in self.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, path: str | Path, target: Transformer) -> "Drafter":
        from safetensors.torch import load_file

        path = Path(path)
        try:
            raw = json.loads((path / CONFIG_FILE).read_text())
            config = DrafterConfig(**raw)
        except FileNotFoundError:
            raise FlexDraftError(f"no drafter at {path} (expected {CONFIG_FILE} and {WEIGHTS_FILE})") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise FlexDraftError(f"corrupt drafter config {path / CONFIG_FILE}: {exc}") from None
        identity = model_identity(target)
        if config.target != identity:
            raise FlexDraftError(
                f"drafter {path} was trained for another target ({config.target.get('model_type')} "
                f"{config.target.get('num_layers')} layers, weights {config.target.get('weights_sha')}); "
                f"this target is {identity['model_type']} {identity['num_layers']} layers, weights {identity['weights_sha']}")
        try:
            tensors = load_file(str(path / WEIGHTS_FILE))
        except Exception as exc:
            raise FlexDraftError(f"corrupt drafter weights {path / WEIGHTS_FILE}: {exc}") from None
        drafter = cls(target, config)
        try:
            drafter.load_state_dict(tensors)
        except RuntimeError as exc:
            raise FlexDraftError(f"drafter weights {path / WEIGHTS_FILE} do not fit its config: {exc}".splitlines()[0]) from None
        vocab = drafter.draft_vocab
        if vocab is not None and not (bool((vocab >= 0).all()) and bool((vocab < identity["vocab_size"]).all())
                                      and bool((vocab[1:] > vocab[:-1]).all())):
            raise FlexDraftError(f"corrupt drafter weights {path / WEIGHTS_FILE}: the draft vocabulary is not a set of "
                                 f"the target's token ids")
        return drafter.to(device=target.device, dtype=target.dtype).eval()
