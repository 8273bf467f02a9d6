"""Sampling parameters and the one function that turns logits into the distribution every mode samples from."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 means greedy
    top_k: int = 0             # 0 means no top-k
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax after temperature, top-k and top-p, in float32, over the last dimension.

    Greedy uses temperature 1 here: its probabilities only serve as draft confidence.
    """
    logits = logits.float()
    if not params.greedy:
        logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = probs.masked_fill(top_p_drop(probs, params.top_p), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


# A CPU looks for the top-p prefix among this many most probable tokens first, then among more. Sampled rows of the
# default model at temperature 0.8, top-p 0.95 (MT-bench): the prefix held 7 tokens at the median, at most 64 in 82%
# of rows, at most 1024 in all.
TOP_P_CANDIDATES = (64, 1024)


def top_p_drop_reference(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Where top-p drops a token: outside the smallest most-probable prefix whose mass reaches top_p (the first
    token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    return drop_sorted.scatter(-1, order, drop_sorted)


def top_p_drop(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``top_p_drop_reference``, without sorting the vocabulary where it can: on a CPU a 49k-word sort costs ~2.5 ms
    per row, ~7% of a decode step per sampled row. When the top k tokens (``topk``, sorted) reach top_p, every token
    after them is dropped and their own running sums are the sort's first ones. Otherwise (a row flatter than every
    candidate count), and off the CPU (where sorting is cheap and the check would sync with the host), it sorts."""
    if probs.device.type == "cpu":
        for k in TOP_P_CANDIDATES:
            if k >= probs.shape[-1]:
                break
            top, order = probs.topk(k, dim=-1)
            mass = top.cumsum(dim=-1)
            if bool((mass[..., -1] >= top_p).all()):
                return torch.ones_like(probs, dtype=torch.bool).scatter(-1, order, (mass - top) >= top_p)
    return top_p_drop_reference(probs, top_p)


def sample(probs: torch.Tensor, race_noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax(p / E) with E ~ Exp(1) is a sample from p, with no host sync."""
    return (probs / race_noise).argmax(dim=-1)


# Where top-k / top-p leave at most this share of the vocabulary, a CPU draws race noise only for the tokens they keep.
SPARSE_RACE_SHARE = 1 / 8


def kept_tokens(weights: torch.Tensor) -> torch.Tensor | None:
    """On a CPU, the tokens of nonzero weight [B, V] as indices [B, k] (rows with fewer pad with tokens of weight 0)
    where they are few enough that drawing race noise for them alone pays: each variate costs its own hash, ~0.5 ms
    per row for a 49k vocabulary. None otherwise, and off the CPU, where the check would sync with the host and the
    full draw is cheap."""
    if weights.device.type != "cpu":
        return None
    kept = int((weights > 0).sum(dim=-1).max())
    return weights.topk(kept, dim=-1).indices if kept <= weights.shape[-1] * SPARSE_RACE_SHARE else None


def race_noise(streams, weights: torch.Tensor) -> torch.Tensor:
    """The next ``streams.exponential(V)`` draw [B, V] (a ``flexdraft.rng.Streams``) for races among the tokens of
    nonzero ``weights`` [B, V]: where ``kept_tokens`` finds them few, only their variates are computed (hashed by
    index, the very values of the full draw) and the rest are +inf, which never win (w / inf = 0)."""
    index = kept_tokens(weights)
    if index is None:
        return streams.exponential(weights.shape[-1])
    noise = torch.full(weights.shape, float("inf"), dtype=torch.float64, device=weights.device)
    return noise.scatter(-1, index, streams.exponential_at(index))


def draw(probs: torch.Tensor, streams) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] from each row's stream: ``sample`` with the next ``exponential(V)``,
    raced among the kept tokens alone where ``kept_tokens`` finds them."""
    index = kept_tokens(probs)
    if index is None:
        return sample(probs, streams.exponential(probs.shape[-1]))
    winner = sample(probs.gather(-1, index), streams.exponential_at(index))
    return index.gather(-1, winner[:, None]).squeeze(-1)
