"""The batch-sweep benchmark, ``flexdraft bench``: every configuration at every batch size, measured in one run with
interleaved repetitions; a JSON of every measurement with its provenance, and medians.

Configurations: our ``ar``, ``sequential``, ``parallel`` and ``flex``; transformers ``generate`` (``hf``, greedy) and
transformers prompt-lookup decoding (``hf-lookup``, greedy, batch 1 only). A measurement at batch size b generates
for ``max(prompts, b)`` prompts (rounded up to whole batches) in batches of b. MT-bench prompts go through the chat
template; HumanEval prompts are code to complete, given raw. Repetitions are interleaved: within a (setting, data
set, batch size) cell each repetition runs every configuration once, in an order rotated per repetition, so the
configurations compared are measured side by side.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from experiments.provenance import provenance
from flexdraft.speculative import VERIFY_THRESHOLD

CONFIGS = ("ar", "sequential", "parallel", "flex", "hf", "hf-lookup")
OUR_MODES = ("ar", "sequential", "parallel", "flex")
SETTINGS = {"greedy": {"temperature": 0.0, "top_p": 1.0}, "sample": {"temperature": 0.8, "top_p": 0.95}}
DATASETS = ("mtbench", "humaneval")


@dataclass
class BenchConfig:
    configs: tuple[str, ...] = CONFIGS
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    datasets: tuple[str, ...] = DATASETS
    settings: tuple[str, ...] = tuple(SETTINGS)
    prompts: int = 16
    max_new_tokens: int = 128
    repeats: int = 3
    verify_threshold: float = VERIFY_THRESHOLD
    seed: int = 0
    extra: dict = field(default_factory=dict)   # recorded as is (model, dtype, drafter, backend)


# Short enough for `make demo` on a 2-core CPU (a few minutes), long enough for the crossover to show.
SHORT = dict(configs=("ar", "sequential", "parallel", "flex", "hf"), batch_sizes=(1, 4, 16), datasets=("mtbench",),
             settings=("greedy",), prompts=4, max_new_tokens=32, repeats=2)


def dataset_prompts(name: str) -> tuple[list[str], bool]:
    """(prompts, raw): MT-bench first turns (chat template) or HumanEval stubs (raw completion)."""
    from flexdraft.assets import humaneval_prompts, mtbench_prompts

    if name == "mtbench":
        return mtbench_prompts(), False
    if name == "humaneval":
        return humaneval_prompts(), True
    raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


def held_out_prompts(fd, count: int) -> list[list[int]]:
    """Token ids of prompts from the end of each evaluation set: the bench takes its prompts from the start."""
    ids = []
    for i, name in enumerate(DATASETS):
        prompts, raw = dataset_prompts(name)
        take = count // len(DATASETS) + (1 if i < count % len(DATASETS) else 0)
        ids += fd.encode(prompts[len(prompts) - take:], raw=raw) if take else []
    return ids


def batch_prompts(ids: list[list[int]], batch: int, count: int) -> list[list[int]]:
    """``max(count, batch)`` prompts rounded up to whole batches, taken in order (cycling only past the data set)."""
    n = -(-max(count, batch) // batch) * batch
    return [ids[i % len(ids)] for i in range(n)]


def prompt_lengths(ids: list[list[int]], batch: int, device_type: str = "cpu") -> dict:
    """Per prompt, the mean of: its tokens; its padded length (its batch's longest, what a right-padded prefill such
    as transformers' computes); and the rows our prefill computes for it (passes of similar length)."""
    from flexdraft.generate import pass_overhead_tokens, prefill_passes

    batches = [ids[i: i + batch] for i in range(0, len(ids), batch)]
    overhead = pass_overhead_tokens(device_type)
    rows = sum(len(group) * max(len(b[i]) for i in group)
               for b in batches for group in prefill_passes([len(p) for p in b], overhead))
    return {"prompt_tokens": statistics.mean(map(len, ids)),
            "padded_prompt_tokens": statistics.mean(max(map(len, b)) for b in batches),
            "prefill_tokens": rows / len(ids)}


def applicable(config: str, batch: int, setting: str) -> bool:
    if config in ("hf", "hf-lookup") and setting != "greedy":
        return False      # transformers baselines: greedy only (their sampling is not the same distribution code)
    return config != "hf-lookup" or batch == 1


def run_one(config: str, fd, hf, ids: list[list[int]], batch: int, setting: str, cfg: BenchConfig) -> dict:
    """One measurement: tokens, seconds and (our modes) the engine's statistics."""
    if config in OUR_MODES:
        result = fd.generate(prompt_ids=ids, mode=config, max_new_tokens=cfg.max_new_tokens, batch_size=batch,
                             seed=cfg.seed, verify_threshold=cfg.verify_threshold, **SETTINGS[setting])
        s = result.stats
        return {"new_tokens": s.new_tokens, "seconds": s.seconds, "tokens_per_s": s.tokens_per_s,
                "mean_accepted": s.mean_accepted, "accept_histogram": s.accept_histogram,
                "mode_steps": dict(s.mode_steps), "target_forwards": s.target_forwards,
                "mean_batch": s.row_forwards / s.target_forwards if s.target_forwards else 0.0,
                "policy": result.policy}
    from flexdraft.baselines import hf_generate

    pad = fd.tokenizer.pad_token_id if fd.tokenizer.pad_token_id is not None else fd.stop_ids()[0]
    outputs, seconds = hf_generate(hf, ids, cfg.max_new_tokens, fd.stop_ids(), batch_size=batch, pad_id=pad,
                                   prompt_lookup=config == "hf-lookup")
    tokens = sum(map(len, outputs))
    return {"new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}


def summarise(measurements: list[dict]) -> list[dict]:
    """Per (setting, data set, batch size, configuration): medians, and the median of per-repetition ratios to our
    ``ar`` (measured side by side)."""
    cells: dict[tuple, dict[str, dict[int, dict]]] = {}
    for m in measurements:
        key = (m["setting"], m["dataset"], m["batch_size"])
        cells.setdefault(key, {}).setdefault(m["config"], {})[m["repeat"]] = m
    rows = []
    for (setting, dataset, batch), by_config in cells.items():
        ar = by_config.get("ar", {})
        for config, reps in by_config.items():
            rates = [r["tokens_per_s"] for r in reps.values()]
            ratios = [r["tokens_per_s"] / ar[k]["tokens_per_s"] for k, r in reps.items()
                      if k in ar and ar[k]["tokens_per_s"] > 0]
            accepted = [r["mean_accepted"] for r in reps.values() if "mean_accepted" in r]
            rows.append({"setting": setting, "dataset": dataset, "batch_size": batch, "config": config,
                         "repeats": len(rates), "tokens_per_s": statistics.median(rates),
                         "speedup_vs_ar": statistics.median(ratios) if ratios else None,
                         "speedup_range": [min(ratios), max(ratios)] if ratios else None,   # the noise, in view
                         "mean_accepted": statistics.median(accepted) if accepted else None})
    return rows


def bench_with_setup(fd, cfg: BenchConfig, out: Path | None, *, model: str, dtype: str, drafter: str, backend: str,
                     log=lambda message: None) -> dict:
    """``run_bench`` with its set-up: what the run used goes into ``cfg.extra`` (flex's policy and store key when
    flex runs), and transformers is loaded when a baseline is configured."""
    cfg.extra = {"model": model, "dtype": dtype, "drafter": drafter, "backend": backend}
    hf = None
    if any(c.startswith("hf") for c in cfg.configs):
        from flexdraft.api import DTYPES, resolve_model_path
        from flexdraft.baselines import load_hf_model

        hf = load_hf_model(resolve_model_path(model), DTYPES[dtype], fd.model.device)
    if "flex" in cfg.configs:
        from experiments.crossover import entry_key, flex_policy

        policy = flex_policy(fd.model, fd.drafter)
        cfg.extra["flex_policy"] = {"source": policy.source, "choices": policy.describe(),
                                    "store_key": entry_key(fd.model, fd.drafter)}
        log(f"flex policy: {policy.describe()}  [{policy.source}]")
    return run_bench(fd, hf, cfg, out, log)


def run_bench(fd, hf, cfg: BenchConfig, out: Path | None = None, log=lambda message: None) -> dict:
    """Every applicable (setting, data set, batch size, repetition, configuration); written to ``out`` after each
    cell, so a run cut short keeps what it measured."""
    cells = [(s, d, b) for s in cfg.settings for d in cfg.datasets for b in cfg.batch_sizes]
    result = {"schema": 1, "kind": "flexdraft-bench", "provenance": provenance(fd.model.device),
              "config": asdict(cfg), "cells_planned": len(cells), "cells_done": 0, "measurements": [],
              "summary": []}
    encoded = {}
    for name in cfg.datasets:
        prompts, raw = dataset_prompts(name)
        encoded[name] = fd.encode(prompts[:max(cfg.prompts, max(cfg.batch_sizes))], raw=raw)
    warmed = set()
    for setting, name, batch in cells:
        ids = batch_prompts(encoded[name], batch, cfg.prompts)
        configs = [c for c in cfg.configs if applicable(c, batch, setting)]
        if (setting, batch) not in warmed:   # a new batch shape's first run pays for set-up (measured on a GPU:
            warmed.add((setting, batch))     # transformers' first batch-16 run took 3.7x its later ones)
            for config in configs:
                run_one(config, fd, hf, ids[:batch], batch, setting, BenchConfig(max_new_tokens=4, seed=cfg.seed))
        for rep in range(cfg.repeats):
            shift = rep % len(configs)
            for config in configs[shift:] + configs[:shift]:
                m = run_one(config, fd, hf, ids, batch, setting, cfg)
                result["measurements"].append({"config": config, "setting": setting, "dataset": name,
                                               "batch_size": batch, "repeat": rep, "prompts": len(ids),
                                               **prompt_lengths(ids, batch, fd.model.device.type), **m})
                log(f"{setting:7s} {name:9s} b{batch:<3d} rep {rep} {config:10s} {m['tokens_per_s']:8.1f} tokens/s")
        result["summary"] = summarise(result["measurements"])
        result["cells_done"] += 1
        if out is not None:
            write_json(out, result)
    return result


def write_json(path: Path, data: dict, sort_keys: bool = False) -> None:
    """Write then rename: an interrupt leaves the old file or the new one, never half of one."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=sort_keys))
    os.replace(tmp, path)


def table(summary: list[dict], value: str = "tokens_per_s") -> str:
    """Plain-text tables of one summary value: a row per batch size, a column per configuration."""
    lines = []
    for setting, dataset in dict.fromkeys((r["setting"], r["dataset"]) for r in summary):
        rows = [r for r in summary if r["setting"] == setting and r["dataset"] == dataset]
        configs = [c for c in CONFIGS if any(r["config"] == c for r in rows)]
        lines.append(f"{value} ({setting}, {dataset}), median")
        lines.append(f"{'batch':>6}" + "".join(f"{c:>11}" for c in configs))
        for b in sorted({r["batch_size"] for r in rows}):
            cells = {r["config"]: r[value] for r in rows if r["batch_size"] == b}
            lines.append(f"{b:>6}" + "".join(f"{cells[c]:>11.2f}" if cells.get(c) is not None else f"{'-':>11}"
                                              for c in configs))
        lines.append("")
    return "\n".join(lines)


def print_summary(result: dict, file=None) -> None:
    file = file or sys.stdout   # looked up per call: a default bound at import misses later redirections
    print(table(result["summary"]), file=file)
    print(table(result["summary"], "speedup_vs_ar"), file=file)
