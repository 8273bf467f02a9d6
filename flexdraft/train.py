"""``flexdraft train``: attention tuning and bonus-guided calibration on a self-distilled corpus.

Before the first step, the frozen target's residual stream entering the split layer is computed once for every
corpus token and kept (``split_states``; on disk across runs): clean tokens never see masks, so nothing below the
split ever changes. One training step, for a few corpus sequences at once:
1. the clean sequences resume from those states through the tuned layers only, without gradients, filling a KV cache
   (their K/V there are fixed too);
2. many mask blocks, one after each random anchor, run through the tuned layers in one pass: exactly the runtime's
   draft pass (``Transformer.forward`` with a ``MaskStream``), so training and decoding share one attention rule;
3. the loss is cross-entropy on slots 2..B_s against the target's own tokens, over the drafter's draft vocabulary
   (the corpus's most frequent tokens), for the logits calibrated with the true token at slot 1 (the bonus) and
   optionally the raw ones, with position-decayed weights.
Checkpoints are atomic and carry the optimizer and the step, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from flexdraft.drafter import Drafter, DrafterConfig, atomic_directory
from flexdraft.errors import FlexDraftError
from flexdraft.model import MaskStream, Transformer, model_identity
from kernels import backend
from kernels.draft_head import calibration_logits, rms_norm

STATE_WEIGHTS, STATE_OPTIMIZER, STATE_JSON = "drafter_fp32.safetensors", "optimizer.safetensors", "state.json"


@dataclass
class TrainConfig:
    steps: int = 400
    num_tuned_layers: int | None = None  # with init_from: more layers than the loaded drafter's deepens it
    block_size: int = 4              # block 4 x 64 beat 16 x 16 at equal cost (reports/drafter/experiments.md)
    calibration_rank: int = 256      # with init_from: a larger rank widens the loaded MLP, a smaller one is ignored
    sequences_per_step: int = 4
    blocks_per_sequence: int = 64
    lr: float = 1e-2                 # 1e-2 beat 1e-3 and 3e-3; 2e-2 was worse
    warmup_steps: int = 20
    position_decay: float = 7.0      # slot weight exp(-(k-1)/decay) for draft k; 0 switches it off
    raw_loss_weight: float = 0.0     # > 0 also trains the uncalibrated logits directly (costs a second softmax)
    draft_vocab: int = 16384         # a fresh drafter drafts from the corpus's most frequent tokens; 0: all
    kl_weight: float = 0.0           # > 0 adds cross-entropy against the target's own distribution at each slot
    target_labels: bool = False      # label each slot with the target's greedy token, not the corpus's (sampled corpora)
    calibration_lr: float = 0.0      # > 0: the calibration MLP's own peak learning rate (0: the same as lr)
    calibration_weight_decay: float = 0.0   # AdamW decay of the calibration MLP alone (the copies would decay to 0)
    train_attention: bool = True     # false: a calibration-only stage (projector copies and mask_embedding frozen)
    eval_every: int = 50
    eval_sequences: int = 24
    save_every: int = 25
    seed: int = 0
    bf16: bool | None = None         # bf16 autocast; None: on a GPU, or a CPU whose bf16 GEMM is fast
    minutes: float = 0.0             # > 0: a wall-clock budget for the loop; it replaces steps (see fit_steps)


def bf16_autocast(model: Transformer, enabled: bool):
    """bf16 autocast on the target's device (CPU or CUDA) where ``enabled``, a no-op otherwise."""
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=enabled)


# ---- the corpus, and the frozen target's states at the split -----------------------------------------------------
def row_tokens(row: dict) -> list[int]:
    return row["prompt_ids"] + row["response_ids"]


def row_key(row: dict) -> str:
    """A row's name in the state store: its tokens (so a store can never be stale for a row)."""
    import hashlib

    return hashlib.sha1(json.dumps(row_tokens(row)).encode()).hexdigest()[:20]


def pad_sequences(rows: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [B, T] (prompt + response), their lengths, and where each response starts."""
    seqs = [row_tokens(r) for r in rows]
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    starts = torch.tensor([len(r["prompt_ids"]) for r in rows], device=device)
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.int64, device=device)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens, lengths, starts


def frequent_tokens(rows: list[dict], size: int, vocab_size: int) -> list[int] | None:
    """The draft vocabulary: the ``size`` most frequent response tokens, topped up with the lowest unseen ids;
    None (the whole vocabulary) when ``size`` is 0 or covers it."""
    from collections import Counter

    if size <= 0 or size >= vocab_size:
        return None
    counts = Counter(t for r in rows for t in r["response_ids"])
    chosen = [t for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]]
    taken = set(chosen)
    chosen += [t for t in range(vocab_size) if t not in taken][: size - len(chosen)]
    return chosen


class SplitStates:
    """The frozen target's residual stream entering ``layer`` for every token of every corpus row (bf16).

    Clean tokens never see masks, so these states never change while a drafter trains: each is computed once, and
    a step runs only the layers from ``layer`` on. ``directory`` keeps them across runs, a file per layer (rows are
    keyed by their tokens, so a grown corpus computes only its new rows)."""

    def __init__(self, model: Transformer, layer: int, rows: list[dict], directory: Path | None = None,
                 batch: int = 16, bf16: bool = True):
        from safetensors.torch import load_file, save_file
        from tqdm import tqdm

        self.layer = layer
        path = None if directory is None else Path(directory) / f"layer{layer}.safetensors"
        self.states: dict[str, torch.Tensor] = {}
        if path is not None and path.exists():
            try:
                self.states = load_file(str(path))
            except Exception:  # a torn or foreign file: recompute it rather than fail the run
                self.states = {}
        todo = {row_key(r): r for r in rows if row_key(r) not in self.states}
        ordered = sorted(todo.items(), key=lambda item: len(row_tokens(item[1])))   # little padding per batch
        with torch.no_grad(), tqdm(total=len(ordered), desc=f"target states at layer {layer}", unit="row",
                                   disable=len(ordered) < 64) as bar:
            for first in range(0, len(ordered), batch):
                chunk = ordered[first: first + batch]
                tokens, lengths, _ = pad_sequences([r for _, r in chunk], model.device)
                positions = torch.arange(tokens.shape[1], device=model.device)[None].expand_as(tokens)
                with bf16_autocast(model, bf16):
                    hidden, _ = model(tokens, positions, model.new_cache(*tokens.shape), stop_layer=layer)
                for i, (key, _) in enumerate(chunk):   # kept in host memory: a GPU's is for the steps
                    self.states[key] = hidden[i, : int(lengths[i])].to("cpu", torch.bfloat16).contiguous()
                bar.update(len(chunk))
        if path is not None and todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file(self.states, str(tmp))
            os.replace(tmp, path)   # atomic: an interrupt leaves the old store or the new one

    @classmethod
    def of_stores(cls, model: Transformer, layer: int, stores: list[tuple[list[dict], Path | None]],
                  bf16: bool = True) -> SplitStates:
        """One lookup over several stores, each with its rows and its directory (a corpus file's own, so
        training on several corpora reuses each one's states)."""
        parts = [cls(model, layer, rows, directory, bf16=bf16) for rows, directory in stores]
        for part in parts[1:]:
            parts[0].states.update(part.states)
        return parts[0]

    def batch(self, rows: list[dict], tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
        """``(layer, hidden [B, T, h])`` for ``Transformer.forward(start=...)``; padding rows are zeros."""
        hidden = torch.zeros(*tokens.shape, self.states[row_key(rows[0])].shape[-1], device=tokens.device)
        for i, r in enumerate(rows):
            state = self.states[row_key(r)]
            hidden[i, : state.shape[0]] = state.float()
        return self.layer, hidden


def split_states_path(corpus: Path) -> Path:
    """Where ``SplitStates`` of a corpus live between runs: the cache, never the repository."""
    from flexdraft.assets import cache_dir

    return cache_dir() / "states" / Path(corpus).stem


def sample_anchors(lengths, starts, count: int, generator: torch.Generator) -> torch.Tensor:
    """[B, count] anchors: the last clean token a block sees; from the last prompt token to the third-last token
    (so at least one draft slot has a label). Rows with fewer candidates repeat some."""
    low = starts - 1
    span = (lengths - 2 - low).clamp(min=1)
    u = torch.rand(len(lengths), count, generator=generator).to(lengths.device)   # drawn on the CPU: same anchors anywhere
    return low[:, None] + (u * span[:, None]).long()


@torch.no_grad()
def clean_pass(model: Transformer, tokens: torch.Tensor, bf16: bool = False, start=None):
    """The frozen target over the clean tokens: (its KV cache, whose tuned layers are what masks attend to; the
    final hidden states [B, T, h]). ``start`` (from ``SplitStates.batch``) resumes from the stored states instead
    of running every layer."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1])
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
    with bf16_autocast(model, bf16):
        hidden, _ = model(tokens, positions, cache, start=start)
    return cache, hidden


def target_logits(model, clean_hidden, label_pos, head: torch.Tensor) -> torch.Tensor:
    """The target's logits (over the rows of ``head``) for the token at every label position, from the clean
    pass's final hidden states at the position before it. [B, G, Bs-1] positions -> [B, G, Bs-1, V]."""
    B, G, S = label_pos.shape
    before = (label_pos - 1).clamp(max=clean_hidden.shape[1] - 1).flatten(1)
    hidden = clean_hidden.gather(1, before[..., None].expand(-1, -1, clean_hidden.shape[-1]))
    normed = rms_norm(hidden, model.norm, model.config.rms_norm_eps)
    return F.linear(normed, head).view(B, G, S, -1)


@torch.no_grad()
def target_distribution(model, drafter, clean_hidden, label_pos) -> torch.Tensor:
    """The target's own next-token distribution at every labelled slot, over the draft vocabulary (renormalised):
    the soft labels of the KL term. [B, G, Bs-1] positions -> [B, G, Bs-1, Vd]."""
    logits = target_logits(model, clean_hidden, label_pos, drafter.vocab_rows(model.lm_head))
    return torch.softmax(logits.float(), dim=-1)


@torch.no_grad()
def target_greedy_labels(model, drafter, clean_hidden, label_pos) -> torch.Tensor:
    """The target's own greedy token at every labelled slot, given the corpus's tokens before it, as draft-vocabulary
    indices (-1 where the head cannot draft it). For a sampled corpus these differ from the corpus's tokens: the
    engine verifies greedily, so a draft is right when it is the target's argmax, not the token one sample drew."""
    return drafter.draft_indices(target_logits(model, clean_hidden, label_pos, model.lm_head).argmax(-1))


def block_logits(model, drafter, cache, tokens, anchors, calibrate=True):
    """Raw and calibrated draft logits of slots 2..B_s for every anchor over the draft vocabulary, and their labels
    as draft-vocabulary indices (-1 where the head cannot draft the target's token).

    Returns raw [B, G, Bs-1, Vd], calibrated (or None), labels [B, G, Bs-1], label positions [B, G, Bs-1].
    """
    Bs = drafter.block_size
    B, G = anchors.shape
    group_anchor = anchors.repeat_interleave(Bs, dim=1)
    slot = torch.arange(Bs, device=anchors.device).repeat(G)
    masks = MaskStream(positions=group_anchor + 1 + slot[None], anchors=group_anchor, group_size=Bs)
    empty = torch.empty(B, 0, dtype=torch.int64, device=tokens.device)
    _, hidden = model(empty, empty, cache, masks, drafter)
    hidden = hidden.view(B, G, Bs, -1)[:, :, 1:]
    normed = rms_norm(hidden, model.norm, model.config.rms_norm_eps)
    raw = F.linear(normed, drafter.vocab_rows(model.lm_head))
    label_pos = anchors[:, :, None] + 1 + torch.arange(1, Bs, device=anchors.device)[None, None]
    labels = tokens.gather(1, label_pos.clamp(max=tokens.shape[1] - 1).flatten(1)).view(B, G, Bs - 1)
    calibrated = None
    if calibrate:
        bonus = tokens.gather(1, (anchors + 1).clamp(max=tokens.shape[1] - 1))
        bonus_emb = model.embed[bonus][:, :, None].expand(-1, -1, Bs - 1, -1)
        calibrated = raw + calibration_logits(normed, bonus_emb, drafter.calibration)
    return raw, calibrated, drafter.draft_indices(labels), label_pos


def slot_weights(block_size: int, decay: float, device) -> torch.Tensor:
    k = torch.arange(block_size - 1, device=device, dtype=torch.float32)
    return torch.exp(-k / decay) if decay > 0 else torch.ones_like(k)


def loss_on(logits, labels, valid, weights):
    """Weighted cross-entropy over the labelled slots; a label the head cannot draft (-1) carries no weight."""
    valid = valid * (labels >= 0)
    ce = F.cross_entropy(logits.float().flatten(0, -2), labels.clamp(min=0).flatten(), reduction="none")
    w = weights[None, None] * valid
    return (ce.view(labels.shape) * w).sum() / w.sum().clamp(min=1e-6)


def soft_loss_on(logits, target_probs, valid, weights):
    """Weighted cross-entropy against soft labels: KL(p || q) up to p's own (constant) entropy."""
    ce = -(target_probs * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    w = weights[None, None] * valid
    return (ce * w).sum() / w.sum().clamp(min=1e-6)


# ---- evaluation: teacher-forced acceptance ------------------------------------------------------------------------
@torch.no_grad()
def leading_hits(model, drafter, rows, anchors_of, calibrate=True, states: SplitStates | None = None, spare=0,
                 top_k=1):
    """For a few corpus rows: ([B, G] how many leading drafts of the block at each anchor equal the corpus tokens
    (greedy, every draft verified), lengths, starts). ``anchors_of(lengths, starts)`` gives the anchors [B, G];
    labels in the last ``spare`` positions of a row count as misses. ``top_k`` > 1 counts a slot as a hit when the
    corpus token is among its k likeliest drafts; a sequence gives each slot its own k."""
    tokens, lengths, starts = pad_sequences(rows, model.device)
    cache, _ = clean_pass(model, tokens, start=None if states is None else states.batch(rows, tokens))
    anchors = anchors_of(lengths, starts)
    raw, calibrated, labels, label_pos = block_logits(model, drafter, cache, tokens, anchors, calibrate)
    logits = calibrated if calibrate else raw
    widths = torch.as_tensor(top_k, device=logits.device).expand(labels.shape[-1])        # k per draft slot
    widest = int(widths.max())
    drafted = logits.topk(widest, dim=-1).indices if widest > 1 else logits.argmax(-1, keepdim=True)
    within = torch.arange(drafted.shape[-1], device=logits.device) < widths[:, None]     # [slots, k]
    hits = ((drafted == labels[..., None]) & within).any(-1) & (label_pos < (lengths - spare)[:, None, None])
    return hits.long().cumprod(-1).sum(-1), lengths, starts


def acceptance(model, drafter, rows, calibrate=True, anchors_per_sequence=24, batch=4,
               states: SplitStates | None = None) -> float:
    """Mean accepted length (bonus included) if every draft of a block were verified greedily against the
    target's own tokens, averaged over uniformly sampled anchors: 1 + the number of leading slots whose argmax
    equals the corpus token. ``states`` (at the drafter's split) saves the clean pass below it."""
    total, count = 0.0, 0
    generator = torch.Generator().manual_seed(1234)
    for first in range(0, len(rows), batch):
        accepted, *_ = leading_hits(model, drafter, rows[first: first + batch],
                                    lambda lengths, starts: sample_anchors(lengths, starts, anchors_per_sequence,
                                                                           generator), calibrate, states)
        total += float((accepted + 1).sum())
        count += accepted.numel()
    return total / max(count, 1)


def fit_sample(rows: list[dict], count: int) -> list[dict]:
    """A fixed random sample of training rows (the same for every run over a corpus): acceptance there, set against
    held-out acceptance, shows how much of what a drafter learned is memorised rather than general."""
    picks = torch.randperm(len(rows), generator=torch.Generator().manual_seed(4321))[:count]
    return [rows[int(i)] for i in picks]


def walked_acceptance(model, drafter, rows, calibrate=True, batch=4, states: SplitStates | None = None,
                      top_k=1) -> float:
    """Mean accepted length as the engine measures it decoding these answers (greedy, every draft verified, the
    prefill step left out): from the end of the prompt each step gains its block's leading hits + 1 and moves its
    anchor on by as much. Steps land more often where drafts miss, so this is below ``acceptance``'s uniform
    average (measured: 1.40 vs 1.54 on 12 MT-bench answers, 1.49 vs 1.60 on 12 held-out ShareGPT answers).
    ``top_k`` > 1 bounds what tree verification could gain: a tree of each slot's k likeliest drafts (a block's
    slots are drafted in parallel, so its tree is their cartesian product) accepts at least as far. Per-slot
    widths, e.g. (3, 2, 1), bound a trimmed tree (3 + 6 + 6 nodes)."""
    def every_anchor(lengths, starts):
        offsets = torch.arange(int((lengths - starts).max()), device=starts.device)
        return torch.minimum(starts[:, None] - 1 + offsets[None], lengths[:, None] - 1)

    gained, steps = 0, 0
    for first in range(0, len(rows), batch):
        # The engine keeps room for the bonus after the last accepted draft, so the last token is never a draft.
        accepted, lengths, starts = leading_hits(model, drafter, rows[first: first + batch], every_anchor, calibrate,
                                                 states, spare=1, top_k=top_k)
        for row in range(len(lengths)):
            at, end = 0, int(lengths[row] - starts[row]) - 1   # anchor index; the step whose bonus is the last token
            while at < end:
                gain = int(accepted[row, at]) + 1
                gained, steps, at = gained + gain, steps + 1, at + gain
    return gained / max(steps, 1)


# ---- checkpoints --------------------------------------------------------------------------------------------------
def save_state(directory: Path, drafter: Drafter, optimizer, step: int, config: TrainConfig, history: list) -> None:
    from safetensors.torch import save_file

    with atomic_directory(directory / "state") as tmp:
        save_file({k: (v.detach().float() if v.is_floating_point() else v).contiguous()
                   for k, v in drafter.state_dict().items()}, str(tmp / STATE_WEIGHTS))
        moments = {}
        for i, p in enumerate(drafter.parameters()):
            for key, value in optimizer.state.get(p, {}).items():
                moments[f"{i}.{key}"] = value.detach().float().reshape(value.shape).contiguous()
        save_file(moments, str(tmp / STATE_OPTIMIZER))
        (tmp / STATE_JSON).write_text(json.dumps({"step": step, "config": asdict(config), "history": history,
                                                  "drafter_config": asdict(drafter.config)}, indent=1))
    drafter.save(directory / "drafter")


def load_state(directory: Path, model, optimizer_factory):
    from safetensors.torch import load_file

    state = json.loads((directory / "state" / STATE_JSON).read_text())
    drafter = Drafter(model, DrafterConfig(**state["drafter_config"])).to(model.device)
    if drafter.config.target != model_identity(model):
        raise FlexDraftError(f"the checkpoint in {directory} was trained for another target")
    drafter.load_state_dict(load_file(str(directory / "state" / STATE_WEIGHTS)))
    optimizer = optimizer_factory(drafter)
    moments = load_file(str(directory / "state" / STATE_OPTIMIZER))
    for i, p in enumerate(drafter.parameters()):
        entry = {k.split(".", 1)[1]: v for k, v in moments.items() if k.split(".", 1)[0] == str(i)}
        if entry:
            optimizer.state[p] = {k: (v.reshape(()) if k == "step" else v.to(p.device)) for k, v in entry.items()}
    return drafter, optimizer, state["step"], state["history"]


# ---- the loop -----------------------------------------------------------------------------------------------------
def initial_mask_embedding(model, rows, split_layer) -> torch.Tensor:
    """The mean residual-stream state entering the split layer: masks start at the scale clean tokens live at."""
    tokens, lengths, _ = pad_sequences(rows, model.device)
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
        hidden, _ = model(tokens, positions, model.new_cache(*tokens.shape), stop_layer=split_layer)
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
    return hidden[valid].float().mean(0)


def make_optimizer(config: TrainConfig):
    """AdamW over what trains: the calibration MLP (at ``calibration_lr`` when set) and, unless this is a
    calibration-only stage, the projector copies and ``mask_embedding`` (frozen here otherwise). Each group's
    ``peak_lr`` is its learning rate at the top of the schedule."""
    def factory(drafter):
        calibration = list(drafter.calibration)
        attention = [p for p in drafter.parameters() if all(p is not c for c in calibration)]
        for p in attention:
            p.requires_grad_(config.train_attention)
        groups = [{"params": calibration, "peak_lr": config.calibration_lr or config.lr,
                   "weight_decay": config.calibration_weight_decay}]
        if config.train_attention:
            groups.insert(0, {"params": attention, "peak_lr": config.lr, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    return factory


def schedule(config: TrainConfig, step: int) -> float:
    """The learning rate's share of its peak: linear warm-up, then a cosine down to a tenth."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def fit_steps(step: int, seconds_per_step: float, seconds_left: float) -> int:
    """The step count that ends a budgeted run by its deadline, at the pace measured so far, a sixth of what is
    left kept for evaluations and checkpoints. Fitted once, when warm-up ends: the cosine schedule depends on the
    step count only after warm-up, so the learning rate still decays to its floor at the (new) last step. A run
    resumed past warm-up is refitted after ten steps, and its schedule moves to the new count there."""
    return max(step + 1, step + int(seconds_left * 5 / 6 / max(seconds_per_step, 1e-9)))


def train(model: Transformer, rows: list[dict], held_out: list[dict], out: Path, config: TrainConfig,
          resume: bool = True, log=print, init_from: Path | None = None,
          state_stores: list[tuple[list[dict], Path]] | None = None) -> Drafter:
    """Train into ``out``; resume from ``out/state`` when it exists, else start from ``init_from`` (a saved drafter,
    e.g. the committed one, with a fresh optimizer) or from a fresh initialisation. ``state_stores`` keeps the
    target's split-layer states on disk for the next run: each corpus's rows (training and held-out) with its
    directory (``SplitStates``); without it the states live in memory only."""
    from tqdm import tqdm

    if model.dtype != torch.float32:
        raise FlexDraftError("train with the float32 target (bf16 autocast is applied inside)")
    if config.bf16 is None:
        config = replace(config, bf16=model.device.type == "cuda" or backend.cpu_bf16_is_fast())
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    factory = make_optimizer(config)
    if resume and (out / "state" / STATE_JSON).exists():
        drafter, optimizer, start, history = load_state(out, model, factory)
        log(f"resuming from step {start} in {out}")
    elif init_from is not None:
        drafter = Drafter.load(init_from, model).float()
        if config.calibration_rank > drafter.config.calibration_rank:
            log(f"widening the calibration MLP from rank {drafter.config.calibration_rank} to {config.calibration_rank}")
            drafter.widen_calibration(config.calibration_rank, seed=config.seed)
        layers = config.num_tuned_layers
        if layers is not None and layers < drafter.config.num_tuned_layers:
            raise FlexDraftError(f"--num-tuned-layers {layers} is below the {drafter.config.num_tuned_layers} layers of "
                                 f"the drafter in {init_from}: a drafter can gain tuned layers, not lose them")
        if layers is not None and layers > drafter.config.num_tuned_layers:
            log(f"deepening the drafter from {drafter.config.num_tuned_layers} to {layers} tuned layers")
            drafter.deepen(model, layers)
        for p in drafter.parameters():
            p.requires_grad_(True)
        optimizer, start, history = factory(drafter), 0, []
        log(f"continuing from the drafter in {init_from} with a fresh optimizer")
    else:
        vocab = frequent_tokens(rows, config.draft_vocab, model.config.vocab_size)
        drafter = Drafter.initialise(model, config.num_tuned_layers, config.block_size, config.calibration_rank,
                                     seed=config.seed, draft_vocab=vocab)
        with torch.no_grad():
            drafter.mask_embedding.copy_(initial_mask_embedding(model, rows[:8], drafter.split_layer))
        optimizer, start, history = factory(drafter), 0, []
    states = SplitStates.of_stores(model, drafter.split_layer, state_stores or [(rows + held_out, None)],
                                   bf16=config.bf16)
    drafter.train()
    weights = slot_weights(drafter.block_size, config.position_decay, model.device)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed))
    seen_sample = fit_sample(rows, config.eval_sequences)
    bar = tqdm(initial=start, total=config.steps, desc="training drafter", unit="step")
    began, deadline, step = time.time(), time.time() + 60 * config.minutes, start
    while step < config.steps:
        if config.minutes > 0 and step == start + max(config.warmup_steps, 10):
            steps = fit_steps(step, (time.time() - began) / (step - start), deadline - time.time())
            log(f"budget of {config.minutes:g} min: {steps} steps at the pace of the first {step - start}")
            config = replace(config, steps=steps)
            bar.total = steps
        # Deterministic in the step number, so a resumed run sees what an uninterrupted one would have.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        picks = [(step * config.sequences_per_step + i) % len(rows) for i in range(config.sequences_per_step)]
        chosen = [rows[int(order[i])] for i in picks]
        tokens, lengths, starts = pad_sequences(chosen, model.device)
        cache, clean_hidden = clean_pass(model, tokens, config.bf16, states.batch(chosen, tokens))
        anchors = sample_anchors(lengths, starts, config.blocks_per_sequence, generator)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * schedule(config, step)
        autocast = bf16_autocast(model, config.bf16)
        with autocast:
            raw, calibrated, labels, label_pos = block_logits(model, drafter, cache, tokens, anchors)
            if config.target_labels:
                labels = target_greedy_labels(model, drafter, clean_hidden, label_pos)
        valid = (label_pos < lengths[:, None, None]).float()
        loss_cal = loss_on(calibrated, labels, valid, weights)
        loss = loss_cal
        if config.raw_loss_weight > 0:
            loss = loss + config.raw_loss_weight * loss_on(raw, labels, valid, weights)
        if config.kl_weight > 0:
            with autocast:
                teacher = target_distribution(model, drafter, clean_hidden, label_pos)
            loss = loss + config.kl_weight * soft_loss_on(calibrated, teacher, valid, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss_cal.item():.3f}")
        done = step + 1
        record = {"step": done, "loss": round(loss_cal.item(), 4), "time": time.time()}
        if config.minutes > 0 and time.time() > deadline and done < config.steps:
            log(f"the {config.minutes:g} min budget ran out at step {done} of {config.steps}")
            config = replace(config, steps=done)
        if held_out and (done % config.eval_every == 0 or done == config.steps):
            drafter.eval()
            evaluation = held_out[: config.eval_sequences]
            record["tau"] = round(acceptance(model, drafter, evaluation, states=states), 4)
            record["tau_raw"] = round(acceptance(model, drafter, evaluation, False, states=states), 4)
            record["tau_walk"] = round(walked_acceptance(model, drafter, evaluation, states=states), 4)
            record["tau_train"] = round(acceptance(model, drafter, seen_sample, states=states), 4)
            drafter.train()
            bar.write(f"step {done}: held-out mean accepted length {record['tau']:.3f} "
                      f"(without calibration {record['tau_raw']:.3f}; decoding as the engine does "
                      f"{record['tau_walk']:.3f}; on training answers {record['tau_train']:.3f}), "
                      f"loss {record['loss']:.3f}")
        history.append(record)
        if done % config.save_every == 0 or done == config.steps:
            save_state(out, drafter, optimizer, done, config, history)
        bar.update(1)
        step = done
    bar.close()
    drafter.eval()
    return drafter
