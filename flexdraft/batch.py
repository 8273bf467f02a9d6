"""Bookkeeping of a batch in flight, shared by every decoding mode.

Each sequence keeps its own outputs, stop state and finish reason. Finished sequences leave the batch: ``append``
returns which rows stay, and the caller compacts its per-row state (cache, random streams, drafts) with them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

RUNNING, STOPPED, LENGTH = 0, 1, 2
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}


@dataclass
class Stats:
    new_tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0          # one per step in every mode (the sequential draft pass is not one)
    row_forwards: int = 0             # sum over steps of the rows in the batch: the denominator of mean_accepted
    mask_tokens: int = 0
    lookup_drafts: int = 0            # sequence-steps whose drafts were copied from their own text (prompt lookup)
    accept_histogram: list[int] = field(default_factory=list)   # count of steps by tokens gained (bonus included)
    timings: dict[str, float] = field(default_factory=dict)
    mode_steps: dict[str, int] = field(default_factory=dict)     # speculative steps by mode (flex switches)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """New tokens per target forward per sequence, bonus included: 1.0 for autoregressive decoding."""
        return self.new_tokens / self.row_forwards if self.row_forwards else 0.0

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "seconds": round(self.seconds, 4),
                "tokens_per_s": round(self.tokens_per_s, 2), "target_forwards": self.target_forwards,
                "mean_accepted": round(self.mean_accepted, 4), "mask_tokens": self.mask_tokens,
                "lookup_drafts": self.lookup_drafts,
                "accept_histogram": self.accept_histogram,
                "timings": {k: round(v, 4) for k, v in self.timings.items()}, "mode_steps": dict(self.mode_steps)}


class Batch:
    def __init__(self, num_sequences: int, max_new_tokens: int, stop_ids: list[list[int]], device="cpu"):
        width = max(1, max(len(s) for s in stop_ids))
        self.stop_table = torch.full((num_sequences, width), -1, dtype=torch.int64, device=device)
        for i, stops in enumerate(stop_ids):
            self.stop_table[i, : len(stops)] = torch.tensor(stops, dtype=torch.int64)
        self.max_new_tokens = max_new_tokens
        self.rows = torch.arange(num_sequences, device=device)          # original index of each active row
        self.out = torch.full((num_sequences, max_new_tokens), -1, dtype=torch.int64, device=device)
        self.generated = torch.zeros(num_sequences, dtype=torch.int64, device=device)
        self.finish = torch.zeros(num_sequences, dtype=torch.int64, device=device)

    @property
    def size(self) -> int:
        return self.rows.numel()

    def append(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """Add ``tokens[b, :counts[b]]`` to active row b, cut at its first stop token or at max_new_tokens.

        Returns None when every row goes on, else the indices of the active rows that stay (possibly empty).
        """
        rows = self.rows
        n = tokens.shape[1]
        j = torch.arange(n, device=tokens.device)[None, :]
        room = self.max_new_tokens - self.generated[rows]
        valid = j < torch.minimum(counts, room)[:, None]
        is_stop = (tokens[:, :, None] == self.stop_table[rows][:, None, :]).any(-1) & valid
        has_stop = is_stop.any(dim=1)
        first_stop = torch.where(has_stop, is_stop.int().argmax(dim=1), n)
        take = torch.minimum(torch.minimum(counts, room), first_stop + 1)
        keep = j < take[:, None]
        columns = (self.generated[rows][:, None] + j).clamp(max=self.max_new_tokens - 1)
        row_index = rows[:, None].expand(-1, n)
        self.out[row_index[keep], columns[keep]] = tokens[keep]
        self.generated[rows] += take
        reason = torch.where(has_stop, STOPPED, torch.where(self.generated[rows] >= self.max_new_tokens, LENGTH, RUNNING))
        self.finish[rows] = reason
        running = reason == RUNNING
        if bool(running.all()):
            return None
        stay = running.nonzero().squeeze(1)
        self.rows = rows[stay]
        return stay

    def results(self) -> tuple[list[list[int]], list[str]]:
        counts = self.generated.tolist()
        tokens = [row[:c] for row, c in zip(self.out.tolist(), counts)]
        return tokens, [FINISH_REASONS.get(r, "length") for r in self.finish.tolist()]
