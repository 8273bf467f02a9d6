"""Counter-based random numbers: one independent, reproducible stream per sequence, drawn for a whole batch at once.

Each draw hashes (sequence seed, draw counter, element index) with splitmix64, so a sequence's numbers do not depend
on which other sequences share its batch, and no Python loop over rows (or per-row torch.Generator) is needed.
"""
from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M1 = -4658895280553007687      # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685      # 0x94D049BB133111EB
_LOW53 = (1 << 53) - 1


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _M1
    x = (x ^ _shift_right(x, 27)) * _M2
    return x ^ _shift_right(x, 31)


def uniform(seeds: torch.Tensor, counters: torch.Tensor, shape: tuple[int, ...] | int) -> torch.Tensor:
    """Float64 uniforms in (0, 1) of shape ``[B, *shape]``: row b from stream (seeds[b], counters[b])."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)
    return uniform_at(seeds, counters, idx[None, :]).reshape(seeds.shape[0], *shape)


def uniform_at(seeds: torch.Tensor, counters: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Elements ``index`` ([B, k], or [1, k] for every row) of the draws ``uniform`` makes, flattened: each element
    hashes its own index, so a few of a large draw cost only their own hashes."""
    row_key = _splitmix64(_splitmix64(seeds.to(torch.int64)) ^ counters.to(torch.int64))
    bits = _splitmix64(row_key[:, None] * 1_000_003 + index.to(torch.int64))
    u = (_shift_right(bits, 11) & _LOW53).to(torch.float64) + 0.5
    return u / float(1 << 53)


def exponential(seeds: torch.Tensor, counters: torch.Tensor, shape) -> torch.Tensor:
    """Exp(1) noise for the exponential race: ``argmax(w / E)`` samples index i with probability w_i / sum(w)."""
    return -torch.log(uniform(seeds, counters, shape))


class Streams:
    """The random streams of a batch: a seed per sequence and a counter advanced after every draw."""

    def __init__(self, seeds: torch.Tensor):
        self.seeds = seeds.to(torch.int64)
        self.counters = torch.zeros_like(self.seeds)

    def keep(self, rows: torch.Tensor) -> None:
        """Follow the batch as finished sequences leave it."""
        self.seeds, self.counters = self.seeds[rows], self.counters[rows]

    def _next(self) -> torch.Tensor:
        counters = self.counters
        self.counters = counters + 1
        return counters

    def uniform(self, shape) -> torch.Tensor:
        return uniform(self.seeds, self._next(), shape)

    def exponential(self, shape) -> torch.Tensor:
        return exponential(self.seeds, self._next(), shape)

    def exponential_at(self, index: torch.Tensor) -> torch.Tensor:
        """Elements ``index`` [B, k] of the next ``exponential`` draw (of any size covering them), in one draw."""
        return -torch.log(uniform_at(self.seeds, self._next(), index))
