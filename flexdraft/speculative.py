"""FlexDraft speculative decoding: parallel draft-and-verify, sequential draft-then-verify, and flex between them.

State between steps, per active sequence (all batched, no loops over rows):
  cache.lengths  tokens already in the KV cache; the bonus token stands at that position, not yet run
  bonus          the last resolved token
  drafts         [B, W] drafts for the positions after the bonus (W = Bs-1, more where prompt-lookup copies are
                 longer), with confidence and (sampling) their q, and (trees) each slot's likeliest candidates;
                 None after a sequential or ``ar`` step

Read ``generate_speculative`` top to bottom: prefill drafts a first block, then each step verifies ``verify_len``
drafts. A parallel step drafts the next block in the same pass; a sequential step verifies alone and the next step
opens with the draft pass. Where a row's text repeats itself, its drafts are copied from what followed the last time
instead (prompt lookup, ``flexdraft/lookup.py``, up to ``SpecConfig.lookup_len`` tokens); where every row copies,
the step needs no drafter at all, and a parallel step verifies alone too. Where one row is decoding, a sequential
step verifies a tree of the likeliest paths through the candidates instead of a chain (``flexdraft/tree.py``,
``tree_step``; ``parallel_tree_step`` with ``--parallel-trees``). Flex chooses the step per batch size
(``experiments/crossover.py``); where speculation does not pay it may run a plain ``ar`` step, which leaves no
drafts either.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from flexdraft.batch import Batch, Stats
from flexdraft.drafter import Drafter
from flexdraft.generate import choose_tokens, decode_one_token, prefill
from flexdraft.lookup import COPY_LEN, LONGEST_COPY, PromptLookup
from flexdraft.model import KVCache, MaskStream, Transformer
from flexdraft.rng import Streams
from flexdraft.sampling import SamplingParams, draw, probabilities, race_noise
from flexdraft.tree import TREE_NODES, DraftTree, build_tree, compact, greedy_choice, walk
from kernels.block_attention import MAX_TREE_SLOTS, tree_bits
from kernels.draft_head import calibrated_logits, draft_head
from kernels.verify import verify_greedy, verify_sampling

VERIFY_STRATEGIES = ("cumulative_product", "min_confidence")
MODES = ("sequential", "parallel")
STEP_MODES = MODES + ("ar",)   # what a flex policy may choose per step


# Drafts verified while their cumulative confidence reaches this (and a tree's paths). Each verified row costs a
# 2-core CPU ~1.5 ms of FMAs against an ar step's ~11 ms, so a draft must be accepted about one time in seven to
# pay: batch 1, 64 new tokens, 20 + 21 prompts (reports/drafter/experiments.md, session 30), 0.01 -> 0.1 took
# sequential (8-node trees) 0.76x -> 0.83x / 1.17x -> 1.23x ar on MT-bench / HumanEval and parallel 0.70x -> 0.78x /
# 1.08x -> 1.16x, at 0.24 / 0.17 fewer tokens per step. Where rows are nearly free (a GPU at small batch) a lower one
# pays; flex takes each batch size's from the device's store.
VERIFY_THRESHOLD = 0.1


@dataclass
class SpecConfig:
    verify_threshold: float = VERIFY_THRESHOLD
    verify_strategy: str = "cumulative_product"
    calibration: bool = True
    lookup: bool = True            # copy drafts where a row's text repeats itself (flexdraft/lookup.py)
    # Tokens a copy drafts (never fewer than the drafter's Bs-1), up to a batch of ``long_copy_batch`` rows; while a
    # row's copies are accepted whole, twice as many each step, up to ``longest_copy`` (no more than the first: no
    # growth). In a larger batch copies draft Bs-1: one row's long copy widens every row's step (slower at batch 4
    # and 8 on a CPU).
    lookup_len: int = COPY_LEN
    longest_copy: int = LONGEST_COPY
    long_copy_batch: int = 1
    # Sequential steps verify a tree of up to this many drafts (flexdraft/tree.py): the likeliest paths through
    # each slot's candidates whose probability reaches the verify threshold; 0: a chain. Trees run up to a batch of
    # ``tree_batch`` rows: each node is a query row of the target's pass, and a batch multiplies them.
    tree_nodes: int = TREE_NODES
    tree_batch: int = 1
    # Parallel steps verify trees too, a mask group per node (``parallel_tree_step``): on a 2-core CPU the extra mask
    # rows cost more than the tree gains; where query rows are nearly free (a GPU at small batch) they may not.
    parallel_trees: bool = False

    def __post_init__(self):
        # a tree's nodes and a copy's tokens each fill a step's draft slots
        for flag, drafts in (("--tree-nodes", self.tree_nodes), ("--lookup-len", self.lookup_len),
                             ("--longest-copy", self.longest_copy)):
            if not 0 <= drafts <= MAX_TREE_SLOTS - 1:
                raise ValueError(f"{flag} must be in [0, {MAX_TREE_SLOTS - 1}], got {drafts}")
        if self.verify_strategy not in VERIFY_STRATEGIES:
            raise ValueError(f"--verify-strategy must be one of {', '.join(VERIFY_STRATEGIES)}")
        if not 0 <= self.verify_threshold <= 1:
            raise ValueError(f"--verify-threshold must be in [0, 1], got {self.verify_threshold}")


@dataclass
class Drafts:
    tokens: torch.Tensor           # [B, W], W = Bs-1 from the drafter, more where prompt-lookup copies are longer
    confidence: torch.Tensor       # [B, W] max draft probability per slot; 0 where a slot holds no draft
    probs: torch.Tensor | None     # [B, W, V] q, only when sampling
    # (tokens, probabilities) [B, W, K]: each slot's K likeliest drafts, for a tree step (SpecConfig.tree_nodes)
    top: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep(self, rows):
        return Drafts(self.tokens[rows], self.confidence[rows], None if self.probs is None else self.probs[rows],
                      None if self.top is None else (self.top[0][rows], self.top[1][rows]))

    def widened(self, width: int) -> "Drafts":
        """These drafts padded to ``width`` slots with empty ones (confidence 0: never verified)."""
        pad = width - self.tokens.shape[1]
        if pad <= 0:
            return self
        return Drafts(F.pad(self.tokens, (0, pad)), F.pad(self.confidence, (0, pad)),
                      None if self.probs is None else F.pad(self.probs, (0, 0, 0, pad)),
                      None if self.top is None else tuple(F.pad(t, (0, 0, 0, pad)) for t in self.top))

    @staticmethod
    def copied(tokens: torch.Tensor, vocab_size: int | None) -> "Drafts":
        """Certain proposals ``tokens`` [B, W]: confidence 1 and (with ``vocab_size``, when sampling) q one-hot;
        a -1 (past a shorter copy's end) is an empty slot, whose token 0 only pads a pass."""
        present = tokens >= 0
        tokens = tokens.clamp(min=0)
        probs = None if vocab_size is None else F.one_hot(tokens, vocab_size).float()
        return Drafts(tokens, present.float(), probs)

    def replaced(self, rows: torch.Tensor, tokens: torch.Tensor) -> "Drafts":
        """These drafts with copies ``tokens`` [B, W'] (``copied``) instead where ``rows`` [B] is set. A longer copy
        widens every row; the others' extra slots stay empty."""
        if not bool(rows.any()):
            return self
        width = max(self.tokens.shape[1], tokens.shape[1])
        mine = self.widened(width)
        # One-hot q only for the copied rows, written in place of theirs (and in their dtype).
        copies = Drafts.copied(tokens[rows], None if self.probs is None else self.probs.shape[-1]).widened(width)
        probs = None if mine.probs is None else mine.probs.index_put((rows,), copies.probs.to(mine.probs.dtype))
        top = None
        if mine.top is not None:   # a copy is its slot's only candidate
            others = mine.top[0].shape[-1] - 1
            top = (mine.top[0].index_put((rows,), F.pad(copies.tokens[..., None], (0, others))),
                   mine.top[1].index_put((rows,), F.pad(copies.confidence[..., None], (0, others)).to(mine.top[1].dtype)))
        return Drafts(mine.tokens.index_put((rows,), copies.tokens),
                      mine.confidence.index_put((rows,), copies.confidence.to(mine.confidence.dtype)), probs, top)


@contextmanager
def timed(stats: Stats, key: str):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats.timings[key] = stats.timings.get(key, 0.0) + time.perf_counter() - start


def verify_len(confidence: torch.Tensor, spec: SpecConfig, threshold: float | None = None) -> torch.Tensor:
    """How many leading drafts to verify, from their confidence; clamped to [1, W]. An empty slot (confidence 0)
    ends the drafts whatever the threshold.

    ``threshold`` (flex: the one the harness chose for this batch size) overrides ``spec.verify_threshold``."""
    threshold = spec.verify_threshold if threshold is None else threshold
    if spec.verify_strategy == "cumulative_product":
        passing = confidence.cumprod(dim=1) >= threshold
    else:
        passing = confidence >= threshold
    passing &= confidence > 0
    leading = passing.to(torch.int64).cumprod(dim=1).sum(dim=1)
    return leading.clamp(1, confidence.shape[1])


def mask_block(anchor: torch.Tensor, num_groups: int, block_size: int) -> MaskStream:
    """``num_groups`` mask groups per row; group a stands at ``anchor + a + 1 ..`` and sees the cache up to
    ``anchor + a`` (the clean tokens 0..a of a parallel step)."""
    group = torch.arange(num_groups, device=anchor.device).repeat_interleave(block_size)
    slot = torch.arange(block_size, device=anchor.device).repeat(num_groups)
    anchors = anchor[:, None] + group[None, :]
    return MaskStream(positions=anchors + 1 + slot[None, :], anchors=anchors, group_size=block_size)


def next_drafts(model: Transformer, drafter: Drafter, block_hidden: torch.Tensor, bonus: torch.Tensor,
                params: SamplingParams, spec: SpecConfig, streams: Streams) -> Drafts:
    """Calibrated draft head over slots 2..Bs of one block per row ([B, Bs, h]); slot 1 is the bonus's place."""
    B, Bs, h = block_hidden.shape
    slots = block_hidden[:, 1:].reshape(B * (Bs - 1), h)
    bonus_emb = model.embed[bonus].repeat_interleave(Bs - 1, dim=0)
    lm_head, calibration = drafter.head_weights(model)   # lm_head: the rows of the draft vocabulary
    calibration = calibration if spec.calibration else None
    if spec.tree_nodes and B <= spec.tree_batch:
        # A tree step needs each slot's likeliest candidates, not one draft: the head's logits in full. The
        # candidates are certain proposals (not samples of q), so a chain of them verifies as copies do: q one-hot.
        logits = calibrated_logits(slots, model.norm, model.config.rms_norm_eps, lm_head, bonus_emb, calibration)
        top_probs, top_indices = probabilities(logits, params).topk(min(spec.tree_nodes, lm_head.shape[0]), dim=-1)
        tokens = drafter.target_ids(top_indices).view(B, Bs - 1, -1)
        top_probs = top_probs.view(B, Bs - 1, -1)
        one_hot = Drafts.copied(tokens[..., 0], None if params.greedy else model.config.vocab_size).probs
        return Drafts(tokens[..., 0], top_probs[..., 0], one_hot, (tokens, top_probs))
    noise = None if params.greedy else streams.exponential((Bs - 1) * lm_head.shape[0]).view(B * (Bs - 1), -1)
    indices, _, max_prob, probs = draft_head(
        slots, model.norm, model.config.rms_norm_eps, lm_head, bonus_emb, calibration, params=params,
        race_noise=noise)
    # Verification reads q over the target's vocabulary (zero where the head cannot draft).
    return Drafts(drafter.target_ids(indices).view(B, Bs - 1), max_prob.view(B, Bs - 1).float(),
                  None if probs is None else drafter.on_target_vocab(probs).view(B, Bs - 1, -1))


def verify(logits: torch.Tensor, drafts: Drafts, num_drafts: torch.Tensor, kv_len: torch.Tensor,
           params: SamplingParams, streams: Streams):
    """Target logits at [bonus, d_1..d_n] -> (tokens [B, n+1] padded -1, accept_len, new cache length)."""
    n = logits.shape[1] - 1
    draft_tokens = drafts.tokens[:, :n]
    if params.greedy:
        return verify_greedy(draft_tokens, num_drafts, logits.argmax(dim=-1), kv_len)
    target_probs = probabilities(logits, params)
    uniforms = streams.uniform(n).to(target_probs.dtype)
    # The resolved token races (p - q)+ or p at one position: within the tokens some position's p keeps.
    noise = race_noise(streams, target_probs.amax(dim=1)).to(target_probs.dtype)
    return verify_sampling(draft_tokens, num_drafts, drafts.probs[:, :n], target_probs, uniforms, noise, kv_len)


@torch.no_grad()
def prefill_with_drafts(model, drafter, prompts, cache: KVCache, params, spec, streams, stats, drafts: bool = True):
    """Prompts through all layers plus one mask block after each; returns the first token and the first drafts
    (without ``drafts``: no mask block, and None)."""
    block = (lambda lengths: mask_block(lengths - 1, 1, drafter.block_size)) if drafts else None
    with timed(stats, "target_forward"):
        last, mask_hidden = prefill(model, prompts, cache, block, drafter)
        bonus = choose_tokens(model.logits(last), params, streams)
    if not drafts:
        return bonus, None
    stats.mask_tokens += mask_hidden.shape[0] * mask_hidden.shape[1]
    with timed(stats, "draft_head"):
        drafts = next_drafts(model, drafter, mask_hidden, bonus, params, spec, streams)
    return bonus, drafts


def clean_step_tokens(cache, bonus, drafts, num_drafts):
    """[bonus, d_1..d_n] at positions L..L+n, n = the batch's largest verify length (shorter rows are padding)."""
    n = int(num_drafts.max())
    tokens = torch.cat([bonus[:, None], drafts.tokens[:, :n]], dim=1)
    positions = cache.lengths[:, None] + torch.arange(n + 1, device=tokens.device)[None, :]
    return tokens, positions


@torch.no_grad()
def parallel_step(model, drafter, cache, bonus, drafts, num_drafts, params, spec, streams, stats):
    """One target pass: verify [bonus, drafts] and, beside them, draft from every possible acceptance length."""
    tokens, positions = clean_step_tokens(cache, bonus, drafts, num_drafts)
    num_groups = tokens.shape[1]
    masks = mask_block(cache.lengths, num_groups, drafter.block_size)
    with timed(stats, "target_forward"):
        clean_hidden, mask_hidden = model(tokens, positions, cache, masks, drafter)
        logits = model.logits(clean_hidden)
    stats.mask_tokens += mask_hidden.shape[0] * mask_hidden.shape[1]
    with timed(stats, "verify"):
        out, accept_len, cache.lengths = verify(logits, drafts, num_drafts, cache.lengths, params, streams)
        new_bonus = out.gather(1, accept_len[:, None]).squeeze(1)
    # The group of the realised acceptance length drafts the next block; calibration tells it the new bonus.
    groups = mask_hidden.view(mask_hidden.shape[0], num_groups, drafter.block_size, -1)
    block = groups[torch.arange(groups.shape[0], device=groups.device), accept_len]
    with timed(stats, "draft_head"):
        new_drafts = next_drafts(model, drafter, block, new_bonus, params, spec, streams)
    return out, accept_len, new_bonus, new_drafts


@torch.no_grad()
def draft_pass(model, drafter, cache, bonus, params, spec, streams, stats) -> Drafts:
    """One block through the tuned layers only. The bonus has not run through the model: the block's slot 1 stands
    at its position (``cache.lengths``) and the block sees the whole cache."""
    masks = mask_block(cache.lengths - 1, 1, drafter.block_size)
    empty = torch.empty(cache.lengths.shape[0], 0, dtype=torch.int64, device=cache.lengths.device)
    with timed(stats, "draft_pass"):
        _, mask_hidden = model(empty, empty, cache, masks, drafter)
    stats.mask_tokens += mask_hidden.shape[0] * mask_hidden.shape[1]
    with timed(stats, "draft_head"):
        return next_drafts(model, drafter, mask_hidden, bonus, params, spec, streams)


@torch.no_grad()
def sequential_step(model, drafter, cache, bonus, drafts, num_drafts, params, spec, streams, stats):
    """A verify pass through the whole target. The draft pass through the tuned layers only follows at the start of
    the next step, and only if some row needs it: rows that finish or copy their next drafts draft nothing."""
    tokens, positions = clean_step_tokens(cache, bonus, drafts, num_drafts)
    with timed(stats, "target_forward"):
        clean_hidden, _ = model(tokens, positions, cache)
        logits = model.logits(clean_hidden)
    with timed(stats, "verify"):
        out, accept_len, cache.lengths = verify(logits, drafts, num_drafts, cache.lengths, params, streams)
        new_bonus = out.gather(1, accept_len[:, None]).squeeze(1)
    return out, accept_len, new_bonus, None


def tree_inputs(cache, bonus, tree: DraftTree):
    """A tree step's clean tokens [bonus, nodes], their positions (the cache length + depth), and (cache slots,
    ancestor bitmasks) for ``Transformer.forward``'s ``tree``: node j is written at slot ``length + j``."""
    tokens = torch.cat([bonus[:, None], tree.tokens], dim=1)
    depth = torch.cat([torch.zeros_like(tree.depth[:, :1]), tree.depth], dim=1)
    slots = cache.lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    return tokens, cache.lengths[:, None] + depth, (slots, tree_bits(tree.ancestors()))


def accept_tree(logits, tree: DraftTree, cache, params, streams):
    """Walk the tree along the target's choices, keep the accepted path in the cache; returns (tokens, accept_len,
    new bonus, the slot of the last accepted node (0: the bonus))."""
    if params.greedy:
        choose = greedy_choice(logits.argmax(dim=-1))
    else:   # one draw from the target at each node the walk reaches
        rows = torch.arange(logits.shape[0], device=logits.device)
        choose = lambda at: draw(probabilities(logits[rows, at], params), streams)  # noqa: E731
    out, accept_len, path, new_lengths = walk(tree, choose, cache.lengths)
    compact(cache, cache.lengths, path, accept_len)
    cache.lengths = new_lengths
    last = path.gather(1, (accept_len - 1).clamp(min=0)[:, None]).squeeze(1) * (accept_len > 0)
    return out, accept_len, out.gather(1, accept_len[:, None]).squeeze(1), last


@torch.no_grad()
def tree_step(model, drafter, cache, bonus, drafts, tree: DraftTree, params, spec, streams, stats):
    """A sequential step that verifies a tree of drafts: its nodes share the pass, each seeing its own path. The
    accepted path's K/V then move to where they stand in the sequence; the rest of the tree is left behind."""
    tokens, positions, slots = tree_inputs(cache, bonus, tree)
    with timed(stats, "target_forward"):
        clean_hidden, _ = model(tokens, positions, cache, tree=slots)
        logits = model.logits(clean_hidden)
    with timed(stats, "verify"):
        out, accept_len, new_bonus, _ = accept_tree(logits, tree, cache, params, streams)
    return out, accept_len, new_bonus, None


@torch.no_grad()
def parallel_tree_step(model, drafter, cache, bonus, drafts, tree: DraftTree, params, spec, streams, stats):
    """A parallel step over a tree: beside the nodes, a mask group anchored at each of them (it sees that node's path)
    drafts the next block; the group of the last accepted node is kept."""
    tokens, positions, (slots, bits) = tree_inputs(cache, bonus, tree)
    B, T, block = tokens.shape[0], tokens.shape[1], drafter.block_size
    group = torch.arange(T, device=tokens.device).repeat_interleave(block)
    slot = torch.arange(block, device=tokens.device).repeat(T)
    masks = MaskStream(positions=positions[:, group] + 1 + slot, anchors=slots[:, group], group_size=block,
                       tree=bits[:, group])
    with timed(stats, "target_forward"):
        clean_hidden, mask_hidden = model(tokens, positions, cache, masks, drafter, tree=(slots, bits))
        logits = model.logits(clean_hidden)
    stats.mask_tokens += mask_hidden.shape[0] * mask_hidden.shape[1]
    with timed(stats, "verify"):
        out, accept_len, new_bonus, last = accept_tree(logits, tree, cache, params, streams)
    groups = mask_hidden.view(B, T, block, -1)
    with timed(stats, "draft_head"):
        new_drafts = next_drafts(model, drafter, groups[torch.arange(B, device=groups.device), last], new_bonus,
                                 params, spec, streams)
    return out, accept_len, new_bonus, new_drafts


@torch.no_grad()
def ar_step(model, drafter, cache, bonus, drafts, num_drafts, params, spec, streams, stats):
    """Flex's fallback where speculation does not pay: the bonus through the target, one new token, no drafts."""
    with timed(stats, "target_forward"):
        logits = decode_one_token(model, bonus, cache)
    new_bonus = choose_tokens(logits, params, streams)
    return new_bonus[:, None], torch.zeros_like(new_bonus), new_bonus, None


STEPS = {"parallel": parallel_step, "sequential": sequential_step, "ar": ar_step}
TREE_STEPS = {"parallel": parallel_tree_step, "sequential": tree_step}   # where drafts carry candidates


def step_choice(choose_mode, batch_size: int) -> tuple[str, float | None]:
    """(mode, verify threshold or None) from a mode callable that returns either."""
    choice = choose_mode(batch_size)
    return choice if isinstance(choice, tuple) else (choice, None)


def verifies_trees(step_mode: str, spec: SpecConfig) -> bool:
    """Whether a step of ``step_mode`` verifies a tree where the batch is small enough (``spec.tree_batch``) and the
    drafts carry candidates: a sequential step, and a parallel one with ``parallel_trees``."""
    return step_mode == "sequential" or (step_mode == "parallel" and spec.parallel_trees)


def may_verify_trees(mode, spec: SpecConfig, batch_size: int) -> bool:
    """Whether some step of ``mode`` may verify a tree, so that the head must draft tree candidates. A flex policy
    says which modes it may run at a batch size (``modes_at``) and is asked at each one up to ``spec.tree_batch``
    that a batch of ``batch_size`` can shrink to; any other callable may choose anything."""
    if not callable(mode):
        return verifies_trees(mode, spec)
    if not hasattr(mode, "modes_at"):
        return True
    return any(verifies_trees(m, spec) for b in range(1, min(batch_size, spec.tree_batch) + 1)
               for m in mode.modes_at(b))


@torch.no_grad()
def generate_speculative(model: Transformer, drafter: Drafter, prompts: list[list[int]], max_new_tokens: int,
                         params: SamplingParams, stop_ids: list[list[int]], seeds: torch.Tensor,
                         mode="parallel", spec: SpecConfig = SpecConfig(), trace: list | None = None
                         ) -> tuple[Batch, Stats]:
    """``mode`` is "parallel", "sequential", or a callable chosen each step (flex): ``(batch_size) -> mode`` or
    ``(batch_size) -> (mode, verify_threshold)``, mode one of ``STEP_MODES``, threshold None for ``spec``'s. A callable
    with an ``observe(mode, batch_size, tokens_per_row)`` method hears what each step gained (``FlexController``).

    ``trace`` (a list, optional) receives one dict per step: mode, drafts' confidence [B, Bs-1], num_drafts and
    accept_len [B] (CPU tensors; None for an ``ar`` step). The roofline harness reads acceptance profiles from it."""
    choose_mode = mode if callable(mode) else (lambda _batch_size: mode)
    observe = getattr(mode, "observe", None)
    if not may_verify_trees(mode, spec, len(prompts)):   # chains only: the head drafts no tree candidates
        spec = replace(spec, tree_nodes=0)
    device = model.device
    block = drafter.block_size
    first_copy = max(block - 1, spec.lookup_len)   # a copy's length where one row is decoding, before it grows
    most_drafts = max(first_copy, spec.longest_copy) if spec.lookup else block - 1   # per row and step
    batch = Batch(len(prompts), max_new_tokens, stop_ids, device)
    streams = Streams(seeds.to(device))
    stats = Stats(accept_histogram=[0] * (most_drafts + 2))
    start = time.perf_counter()
    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens + most_drafts + block + 1
                            + spec.tree_nodes)
    lookup = PromptLookup(prompts, device, first_copy, spec.longest_copy) if spec.lookup else None
    # A flex policy that starts with ar steps gets no drafts until a speculative step needs them.
    first_mode, _ = step_choice(choose_mode, batch.size)
    bonus, drafts = prefill_with_drafts(model, drafter, prompts, cache, params, spec, streams, stats,
                                        drafts=first_mode != "ar")
    stats.target_forwards += 1
    stats.row_forwards += batch.size
    stats.accept_histogram[1] += batch.size
    out, gained = bonus[:, None], torch.ones_like(bonus)
    previous_mode = first_mode
    while True:
        stay = batch.append(out, gained)
        if stay is not None:
            if stay.numel() == 0:
                break
            # Finished sequences leave the batch's work.
            cache.keep(stay)
            streams.keep(stay)
            bonus, drafts = bonus[stay], (None if drafts is None else drafts.keep(stay))
        step_mode, threshold = step_choice(choose_mode, batch.size)
        num_drafts, chain_only = None, False
        if step_mode != "ar":
            long_copies = batch.size <= spec.long_copy_batch
            copies, found = (lookup.propose(batch, first_copy if long_copies else block - 1, long_copies)
                             if lookup is not None else (None, None))
            all_copy = found is not None and bool(found.all())
            if drafts is None and not all_copy:  # after a sequential or ar step, some row has neither
                drafts = draft_pass(model, drafter, cache, bonus, params, spec, streams, stats)
            if found is not None:
                drafts = (Drafts.copied(copies, None if params.greedy else model.config.vocab_size) if all_copy
                          else drafts.replaced(found, copies))
                stats.lookup_drafts += int(found.sum())
            if all_copy and step_mode == "parallel":
                # Every row verifies a copy, so its next drafts are most likely copies again: mask groups drafting
                # for every acceptance length would be thrown away. Verify alone; where no copy follows, the next
                # step opens with the draft pass.
                step_mode = "sequential"
            elif step_mode == "parallel" and previous_mode == "ar":
                # Flex's first speculative step after ar steps (a probe, or a switch) verifies its chain alone: its
                # drafts came from a draft pass anyway, and mask groups would draft for a next step that a probe
                # which does not pay never takes (at batch 1 here they cost ~13 ms, an ar step). The chain is the
                # one a parallel step would verify, so the acceptance flex observes is parallel's.
                step_mode, chain_only = "sequential", True
            room = batch.max_new_tokens - batch.generated[batch.rows]
            num_drafts = torch.minimum(verify_len(drafts.confidence, spec, threshold), (room - 1).clamp(min=1))
            verified = num_drafts   # the chain's length (a tree step replaces num_drafts): what a copy verifies
        step = STEPS[step_mode]
        if (verifies_trees(step_mode, spec) and drafts.top is not None and batch.size <= spec.tree_batch
                and not chain_only):
            # The tree's paths reach as deep as the chain would verify, and a copy as far as it runs (within the
            # slots a tree step holds).
            step, num_drafts = TREE_STEPS[step_mode], build_tree(
                *drafts.top, min(max(spec.tree_nodes, drafts.tokens.shape[1]), MAX_TREE_SLOTS - 1),
                spec.verify_threshold if threshold is None else threshold, max_depth=num_drafts)
        if trace is not None:
            trace.append({"mode": step_mode, "confidence": None if drafts is None else drafts.confidence.cpu(),
                          "num_drafts": None if num_drafts is None else (
                              num_drafts.valid.sum(1) if isinstance(num_drafts, DraftTree) else num_drafts).cpu()})
        out, accept_len, bonus, drafts = step(model, drafter, cache, bonus, drafts, num_drafts, params, spec, streams,
                                              stats)
        if trace is not None:
            trace[-1]["accept_len"] = accept_len.cpu()
        stats.mode_steps[step_mode] = stats.mode_steps.get(step_mode, 0) + 1
        previous_mode = step_mode
        gained = accept_len + 1
        if step_mode != "ar" and found is not None and long_copies:
            lookup.heard(batch, found, verified, accept_len)
        if observe is not None:
            observe(step_mode, batch.size, float(gained.float().mean()))
        stats.target_forwards += 1
        stats.row_forwards += batch.size
        stats.accept_histogram = [c + int(n) for c, n in zip(
            stats.accept_histogram, torch.bincount(gained, minlength=most_drafts + 2).tolist())]
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = int(batch.generated.sum())
    return batch, stats
