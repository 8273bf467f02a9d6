"""Flex's controller replayed at batch 1 over measured acceptance: what a controller constant does to flex against
``ar`` and ``sequential``, in seconds of arithmetic instead of a 40-minute bench sweep.

At batch 1 and greedy, the answer is the same in every mode, and a sequential step's gain depends only on the text
before it (the drafter drafts afresh after every sequential or ar step; copies come from the prompt and answer so
far). So a sequential step is run once after every prefix of each answer (``oracle_gains``), and a replay walks
each answer choosing step by step as the controller does: an ``ar`` step gains one token at cost 1, a sequential
step gains the oracle's tokens at ``cost_ratio``, measured as seconds per step of the two modes side by side
(``step_cost_ratio``). One controller hears all prompts in order, as in one ``generate`` call of the bench. Prefill
is left out (the same in every mode).

    python -m experiments.replay --prompts 32 --max-new-tokens 32 --out reports/<device>/replay-oracle.json
    python -m experiments.replay --load reports/<device>/replay-oracle.json --set MAX_PROBE_GAP=64

prints, per data set and per window of 8 prompts (the bench's first 8 is the first window), sequential's and flex's
speed against ar and flex's against the better of the two.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

WINDOW = 8   # prompts per row of the table: the bench's batch-1 call at --prompts 8


class FirstStepDone(Exception):
    pass


class OneSequentialStep:
    """A flex-style mode that runs one sequential step, keeps its gain and ends the generation (the rest of the
    answer is not needed, and the step still sees the room a whole answer leaves)."""

    def __init__(self):
        self.gain = None

    def __call__(self, batch_size: int) -> str:
        return "sequential"

    def modes_at(self, batch_size: int) -> set[str]:
        return {"sequential"}

    def observe(self, mode: str, batch_size: int, tokens_per_row: float) -> None:
        self.gain = int(tokens_per_row)
        raise FirstStepDone


def oracle_gains(fd, prompt_ids: list[list[int]], max_new_tokens: int, progress: bool = True) -> list[dict]:
    """Per prompt: its greedy answer, and ``gains[k]``: the tokens (bonus included) one sequential step gains once
    ``k + 1`` answer tokens exist (the prefill of prompt + answer[:k] makes answer[k], then one step)."""
    from tqdm import tqdm

    from flexdraft.sampling import SamplingParams
    from flexdraft.speculative import SpecConfig, generate_speculative

    params, spec, stops = SamplingParams(0.0), SpecConfig(), fd.stop_ids()
    rows = []
    for ids in tqdm(prompt_ids, desc="oracle gains", unit="prompt", disable=not progress):
        answer = fd.generate(prompt_ids=[ids], mode="ar", max_new_tokens=max_new_tokens).outputs[0]["token_ids"]
        gains = []
        for k in range(len(answer) - 1):
            step = OneSequentialStep()
            try:
                generate_speculative(fd.model, fd.drafter, [ids + answer[:k]], max_new_tokens - k, params, [stops],
                                     torch.zeros(1, dtype=torch.long), step, spec)
            except FirstStepDone:
                pass
            gains.append(step.gain)   # None (a failing replay) if no step ran
        rows.append({"answer": answer, "gains": gains})
    return rows


def step_cost_ratio(fd, prompt_ids: list[list[int]], max_new_tokens: int, repeats: int = 3) -> float:
    """Seconds per sequential step over seconds per ar step, each the median of ``repeats`` interleaved runs."""
    per_step = {"ar": [], "sequential": []}
    for rep in range(repeats):
        for mode in (("ar", "sequential") if rep % 2 == 0 else ("sequential", "ar")):
            stats = fd.generate(prompt_ids=prompt_ids, mode=mode, max_new_tokens=max_new_tokens).stats
            per_step[mode].append(stats.seconds / (stats.target_forwards - len(prompt_ids)))   # less the prefills
    return statistics.median(per_step["sequential"]) / statistics.median(per_step["ar"])


def replay(rows: list[dict], choose, cost_ratio: float) -> dict:
    """Walk every answer with ``choose(batch_size) -> mode or (mode, threshold)`` (a fixed mode, or a controller that
    also observes each step): decode cost in ar steps, and the speculative steps taken."""
    from flexdraft.speculative import step_choice

    cost, speculative = 0.0, 0
    observe = getattr(choose, "observe", None)
    for row in rows:
        generated, length = 1, len(row["answer"])
        while generated < length:
            mode, _threshold = step_choice(choose, 1)
            gain = 1 if mode == "ar" else min(row["gains"][generated - 1], length - generated)
            if observe is not None:
                observe(mode, 1, float(gain))
            generated += gain
            cost += 1.0 if mode == "ar" else cost_ratio
            speculative += mode != "ar"
    return {"cost": cost, "speculative_steps": speculative}


def compare(rows: list[dict], policy, cost_ratio: float) -> dict:
    """Speeds against ar of sequential everywhere and of flex (a fresh controller of ``policy``)."""
    ar = replay(rows, lambda _b: "ar", cost_ratio)["cost"]
    sequential = replay(rows, lambda _b: "sequential", cost_ratio)["cost"]
    flex = replay(rows, policy.controller(), cost_ratio)
    return {"sequential": ar / sequential, "flex": ar / flex["cost"], "flex_vs_best": min(ar, sequential) / flex["cost"],
            "speculative_steps": flex["speculative_steps"]}


def parse_setting(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    return name.strip(), float(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32, help="per data set, from its start (the bench's first)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", help="write the oracle gains and cost ratios here (JSON)")
    p.add_argument("--load", help="replay a JSON written by --out instead of measuring")
    p.add_argument("--set", action="append", default=[], type=parse_setting, metavar="NAME=VALUE",
                   help="a controller constant of experiments.crossover for this replay, e.g. MAX_PROBE_GAP=64")
    args = p.parse_args(argv)

    import experiments.crossover as crossover
    from flexdraft.api import FlexDraft

    unknown = [name for name, _ in args.set if not hasattr(crossover, name)]
    if unknown:
        print(f"experiments.crossover has no constant {', '.join(unknown)}", file=sys.stderr)
        return 1
    fd = FlexDraft.load("default", drafter="default")
    policy = crossover.flex_policy(fd.model, fd.drafter)
    if policy.speculative is None:
        print(f"no measured predictions to replay: {policy.source}", file=sys.stderr)
        return 1
    if args.load:
        try:
            data = json.loads(Path(args.load).read_text())
            data["data_sets"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"cannot replay {args.load}: {exc!r}", file=sys.stderr)
            return 1
    else:
        from experiments.bench import DATASETS, dataset_prompts, write_json
        from experiments.provenance import provenance

        data = {"provenance": provenance(fd.model.device), "policy": policy.source,
                "max_new_tokens": args.max_new_tokens, "data_sets": {}}
        for name in DATASETS:
            prompts, raw = dataset_prompts(name)
            ids = fd.encode(prompts[:args.prompts], raw=raw)
            data["data_sets"][name] = {"cost_ratio": step_cost_ratio(fd, ids[:WINDOW], args.max_new_tokens),
                                       "rows": oracle_gains(fd, ids, args.max_new_tokens)}
        if args.out:
            write_json(Path(args.out), data)
    for name, value in args.set:
        setattr(crossover, name, type(getattr(crossover, name))(value))
    print(f"{'data set':10s} {'prompts':>8s} {'sequential':>11s} {'flex':>6s} {'flex/best':>10s} {'spec steps':>11s}")
    for name, entry in data["data_sets"].items():
        rows = entry["rows"]
        windows = [(lo, min(lo + WINDOW, len(rows))) for lo in range(0, len(rows), WINDOW)] + [(0, len(rows))]
        for lo, hi in windows:
            r = compare(rows[lo:hi], policy, entry["cost_ratio"])
            print(f"{name:10s} {f'{lo}-{hi}':>8s} {r['sequential']:10.3f}x {r['flex']:5.3f}x {r['flex_vs_best']:9.3f}x "
                  f"{r['speculative_steps']:11d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
