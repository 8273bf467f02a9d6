"""Autoregressive decoding with our runtime: the baseline every other mode is measured against and must equal.

Read top to bottom: ``prefill`` runs the prompts, ``decode_one_token`` runs one step, ``generate_ar`` loops.
"""
from __future__ import annotations

import time

import torch

from flexdraft.batch import Batch, Stats
from flexdraft.model import KVCache, Transformer
from flexdraft.rng import Streams
from flexdraft.sampling import SamplingParams, probabilities, sample


def pad_prompts(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T], positions [B, T] and lengths [B]. Each row starts at position 0: no left padding."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.int64, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
    positions = torch.arange(tokens.shape[1], device=device)[None, :].expand_as(tokens)
    return tokens, positions, lengths


def last_hidden(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token: [B, h]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


def choose_tokens(logits: torch.Tensor, params: SamplingParams, streams: Streams) -> torch.Tensor:
    """The target's token for each row of logits [B, V]: argmax, or a sample from its own random stream."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample(probabilities(logits, params), streams.exponential(logits.shape[-1]))


@torch.no_grad()
def prefill(model: Transformer, tokens, positions, lengths, cache: KVCache) -> torch.Tensor:
    hidden, _ = model(tokens, positions, cache)
    cache.lengths = lengths.clone()
    return model.logits(last_hidden(hidden, lengths))


@torch.no_grad()
def decode_one_token(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    positions = cache.lengths[:, None]
    hidden, _ = model(token[:, None], positions, cache)
    cache.lengths = cache.lengths + 1
    return model.logits(hidden[:, 0])


@torch.no_grad()
def generate_ar(model: Transformer, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                stop_ids: list[list[int]], seeds: torch.Tensor) -> tuple[Batch, Stats]:
    device = model.device
    batch = Batch(len(prompts), max_new_tokens, stop_ids, device)
    streams = Streams(seeds.to(device))
    stats = Stats()
    start = time.perf_counter()
    tokens, positions, lengths = pad_prompts(prompts, device)
    cache = model.new_cache(len(prompts), tokens.shape[1] + max_new_tokens + 1)
    logits = prefill(model, tokens, positions, lengths, cache)
    stats.target_forwards += 1
    stats.row_forwards += batch.size
    token = choose_tokens(logits, params, streams)
    while True:
        stay = batch.append(token[:, None], torch.ones_like(token))
        if stay is not None:
            if stay.numel() == 0:
                break
            cache.keep(stay)
            streams.keep(stay)
            token = token[stay]
        logits = decode_one_token(model, token, cache)
        stats.target_forwards += 1
        stats.row_forwards += batch.size
        token = choose_tokens(logits, params, streams)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = int(batch.generated.sum())
    stats.accept_histogram = [0, stats.row_forwards]
    return batch, stats
