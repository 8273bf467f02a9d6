"""Autoregressive decoding with our runtime: the baseline every other mode is measured against and must equal.

Read top to bottom: ``prefill`` runs the prompts (in passes of similar length), ``decode_one_token`` runs one step,
``generate_ar`` loops.
"""
from __future__ import annotations

import time

import torch

from flexdraft.batch import Batch, Stats
from flexdraft.model import KVCache, Transformer
from flexdraft.rng import Streams
from flexdraft.sampling import SamplingParams, draw, probabilities


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
    return draw(probabilities(logits, params), streams)


# What one extra prefill pass costs, in padded prompt tokens it could instead have run: on a CPU a pass streams the
# weights once (~12 ms for the default model in fp32, the compute of ~20 tokens); on a GPU a pass is launch-bound
# and thousands of extra rows are nearly free, so one padded pass wins.
PASS_OVERHEAD_TOKENS = {"cpu": 32, "cuda": 4096}


def pass_overhead_tokens(device_type: str) -> int:
    """What one prefill pass costs on this device type, in prompt tokens (``prefill`` and the bench's prediction)."""
    return PASS_OVERHEAD_TOKENS.get(device_type, 32)


def prefill_passes(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Rows grouped into prefill passes of similar prompt length. A pass pads every row to its longest, so the groups
    minimise the sum over passes of (rows x longest + ``overhead_tokens``): contiguous runs of the rows sorted by
    length, chosen by dynamic programming (batches are at most a few hundred rows)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0.0] + [float("inf")] * len(order)   # best[j]: cheapest way to run the j shortest rows
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + overhead_tokens + (j - i) * lengths[order[j - 1]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], len(order)
    while j:
        passes.append(order[cut[j]: j])
        j = cut[j]
    return passes[::-1]


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], cache: KVCache, mask_stream=None, drafter=None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts through the target into ``cache``: (final hidden state of each prompt's last token [B, h], and
    with ``mask_stream`` (prompt lengths -> ``MaskStream``) the mask block drafted after it [B, Tm, h], else None).

    Ragged prompts run in passes of similar length (``prefill_passes``), each into a scratch cache whose K/V are
    copied into its rows of ``cache``: padding every prompt to the longest costs up to ~3x the compute on a CPU
    (32 MT-bench prompts: 7,776 padded rows for ~2,700 real tokens)."""
    device = model.device
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    last = torch.empty(len(prompts), model.config.hidden_size, dtype=model.dtype, device=device)
    masks_out = None
    for rows in prefill_passes(lengths.tolist(), pass_overhead_tokens(device.type)):
        tokens, positions, part_lengths = pad_prompts([prompts[i] for i in rows], device)
        scratch = model.new_cache(len(rows), tokens.shape[1])
        masks = None if mask_stream is None else mask_stream(part_lengths)
        hidden, mask_hidden = model(tokens, positions, scratch, masks, drafter)
        index = torch.tensor(rows, device=device)
        cache.k[:, index, :, : tokens.shape[1]] = scratch.k
        cache.v[:, index, :, : tokens.shape[1]] = scratch.v
        last[index] = last_hidden(hidden, part_lengths).to(last.dtype)
        if mask_hidden is not None:
            if masks_out is None:
                masks_out = mask_hidden.new_empty(len(prompts), *mask_hidden.shape[1:])
            masks_out[index] = mask_hidden
    cache.lengths = lengths
    return last, masks_out


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
    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens + 1)
    logits = model.logits(prefill(model, prompts, cache)[0])
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
