"""Prompt-lookup drafts: where the text so far repeats itself, propose what followed the last time.

A small target writes repetitive text, and code reuses its prompt's names. Measured on the shipped drafter's own
steps (default model, batch 1, greedy, 64 new tokens, 80 MT-bench / 80 HumanEval prompts, every draft verified):
copying alone drafts 1.48 / 1.89 tokens per step against the drafter's 1.60 / 1.79, and taking the copy wherever
the last 2 to 4 tokens occurred before, the drafter's drafts elsewhere, 1.78 / 2.18 (reports/drafter/experiments.md,
session 15). A copy is only a proposal: verification checks it like any draft, so the output stays the target's own;
when sampling, its q is one-hot on the copied token. A copy may run past the drafter's block: where one row is
decoding it drafts up to ``COPY_LEN`` tokens (HumanEval 2.08 -> 2.45 tokens per step against copies of 3, session 19);
in a batch, one row's long copy would widen every row's step, so there copies keep to the block
(``flexdraft.speculative.SpecConfig``). Where a row's copy is accepted whole, its next copy doubles, up to
``LONGEST_COPY``: a row caught in a loop verifies it in fewer, longer steps (``PromptLookup.heard``).

Module / reference / test: ``lookup`` here, ``lookup_reference`` beside it, tests/test_lookup.py.
"""
from __future__ import annotations

import torch

NGRAM_MAX = 4   # the longest suffix matched; longer ones found no more copies on the traces above
NGRAM_MIN = 2   # a single repeated token is too weak a signal: it lost to the drafter's drafts there
COPY_LEN = 10   # tokens a copy drafts by default: a repeated run is often longer than the drafter's block (session 19)
# A copy accepted whole doubles the row's next copy, up to this many tokens; any other step starts it over at the
# default. Batch 1, 256 new tokens, 20 + 21 prompts (reports/drafter/experiments.md, session 30): sequential steps
# accept 2.90 -> 2.97 / 4.05 -> 4.31 tokens per step (40: 2.99 / 4.36) at the same speed: on a 2-core CPU each
# verified row costs an FMA-bound ~1.4 ms, so a longer step pays for its tokens; where rows are nearly free (a GPU at
# small batch) the tokens per step are the gain.
LONGEST_COPY = 20


def lookup_reference(history: list[int], num: int, ngram_max: int = NGRAM_MAX,
                     ngram_min: int = NGRAM_MIN) -> list[int] | None:
    """``num`` tokens continuing ``history`` as it went on after the latest earlier occurrence of its longest
    repeated suffix (``ngram_max`` down to ``ngram_min`` tokens); None where no suffix occurred before.

    The continuation repeats with the match's period, so a match right before the suffix ("a b a b" -> "a b a")
    still proposes ``num`` tokens."""
    for n in range(ngram_max, ngram_min - 1, -1):
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start: start + n] == tail:
                period = len(history) - n - start
                return [history[len(history) - period + j % period] for j in range(num)]
    return None


def lookup(history: torch.Tensor, end: torch.Tensor, num: int, ngram_max: int = NGRAM_MAX,
           ngram_min: int = NGRAM_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """``lookup_reference`` for a batch: ``history`` [B, T] holds each row's tokens, -1 where a row has none (before
    its first token and from ``end`` [B] on). Returns (proposals [B, num], found [B]); rows not found hold -1."""
    B, T = history.shape
    rows = torch.arange(B, device=history.device)
    best_start = torch.full((B,), -1, dtype=torch.int64, device=history.device)
    best_n = torch.zeros(B, dtype=torch.int64, device=history.device)
    for n in range(ngram_max, ngram_min - 1, -1):
        if T <= n:
            continue
        tail = history.gather(1, (end[:, None] - n + torch.arange(n, device=history.device)).clamp(min=0))
        usable = (end > n) & (tail >= 0).all(dim=1) & (best_start < 0)
        windows = history.unfold(1, n, 1)                                    # [B, T - n + 1, n]
        starts = torch.arange(windows.shape[1], device=history.device)
        match = (windows == tail[:, None, :]).all(dim=2) & (starts[None, :] < (end - n)[:, None])
        latest = torch.where(match, starts[None, :], -1).max(dim=1).values
        take = usable & (latest >= 0)
        best_start = torch.where(take, latest, best_start)
        best_n = torch.where(take, n, best_n)
    found = best_start >= 0
    period = (end - best_n - best_start).clamp(min=1)
    j = torch.arange(num, device=history.device)
    index = (end - period)[:, None] + j[None, :] % period[:, None]
    proposals = history[rows[:, None], index.clamp(0, T - 1)]
    return torch.where(found[:, None], proposals, -1), found


class PromptLookup:
    """Lookup drafts for the rows of a batch in flight: each row's prompt (kept right-aligned) and what it has
    generated so far (``Batch.out``) make its history. Each row's copy length grows while its copies are accepted
    whole (``heard``): from ``copy_len`` doubling up to ``longest``."""

    def __init__(self, prompts: list[list[int]], device, copy_len: int = COPY_LEN, longest: int = LONGEST_COPY):
        width = max(len(p) for p in prompts)
        self.prompts = torch.full((len(prompts), width), -1, dtype=torch.int64)
        for i, prompt in enumerate(prompts):
            self.prompts[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
        self.prompts = self.prompts.to(device)
        self.copy_len, self.longest = copy_len, max(copy_len, longest)
        self.run = torch.full((len(prompts),), copy_len, dtype=torch.int64, device=device)   # per row of the call

    def propose(self, batch, num: int, grow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(proposals [B, W], found [B]) for the active rows of ``batch`` (a ``flexdraft.batch.Batch``): ``num``
        tokens each, or with ``grow`` as many as the row's run has reached (at least ``num``); -1 past a row's
        length and in rows not found."""
        rows = batch.rows
        history = torch.cat([self.prompts[rows], batch.out[rows]], dim=1)
        if not grow:
            return lookup(history, self.prompts.shape[1] + batch.generated[rows], num)
        lengths = self.run[rows].clamp(min=num)
        proposals, found = lookup(history, self.prompts.shape[1] + batch.generated[rows], int(lengths.max()))
        beyond = torch.arange(proposals.shape[1], device=proposals.device)[None, :] >= lengths[:, None]
        return proposals.masked_fill(beyond, -1), found

    def heard(self, batch, copied: torch.Tensor, verified: torch.Tensor, accepted: torch.Tensor) -> None:
        """After a step over the active rows of ``batch``: rows that verified a copy (``copied``) of ``verified``
        tokens and accepted all of them double their run; every other row starts over."""
        rows = batch.rows
        whole = copied & (accepted >= verified)
        self.run[rows] = torch.where(whole, (2 * self.run[rows]).clamp(max=self.longest), self.copy_len)
