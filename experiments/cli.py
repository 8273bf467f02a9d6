"""``flexdraft roofline``, ``flexdraft bench`` and ``flexdraft report``: parsers and commands (registered by
``flexdraft/cli.py``). Imports stay inside the commands, so ``flexdraft --help`` stays fast."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from flexdraft.errors import FlexDraftError
from flexdraft.speculative import VERIFY_THRESHOLD


def int_list(text: str) -> tuple[int, ...]:
    """An argparse type: '1,2,4' -> (1, 2, 4)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def names(text: str, allowed) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise FlexDraftError(f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return values


def add_device_arg(p) -> None:
    """``--device`` for every command that loads a model (``flexdraft.api.resolve_device`` reads it)."""
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda or cuda:N")


def add_model_args(p) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--drafter", default="default",
                   help="'default' (shipped, trained; falls back to 'untrained' with a warning), 'untrained' or PATH")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--backend", default="torch", choices=["torch", "triton"])
    add_device_arg(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default torch's). On a CPU shared with other jobs use 1: measured here, "
                        "2 threads on 2 busy cores ran a forward 5-15x slower than 1")


def add_parsers(sub) -> None:
    """Add the parsers of ``COMMANDS`` to the ``flexdraft`` subcommands."""
    roof = sub.add_parser("roofline", help="measure step costs and acceptance; write this device's flex store")
    add_model_args(roof)
    roof.add_argument("--quick", action="store_true", help="a small grid (seconds on a tiny model; tests)")
    roof.add_argument("--batch-sizes", type=int_list, default=None, help="default 1,2,4,8,16,32")
    roof.add_argument("--tokens", type=int_list, default=None, help="query tokens per sequence; default 1,2,4,8,16")
    roof.add_argument("--contexts", type=int_list, default=None, help="context lengths; default 256")
    roof.add_argument("--prompt-len", type=int, default=None, help="prefill length measured; default 128")
    roof.add_argument("--repeats", type=int, default=None)
    roof.add_argument("--max-call-tokens", type=int, default=None,
                      help="leave out points larger than this (token-equivalents); the cost table extrapolates")
    roof.add_argument("--acceptance", default=None,
                      help="take the acceptance profile from a flex store or a stats JSON instead of measuring it")
    roof.add_argument("--acceptance-prompts", type=int, default=8,
                      help="held-out prompts (MT-bench and HumanEval tails)")
    roof.add_argument("--acceptance-tokens", type=int, default=48)
    roof.add_argument("--store", default=None, help="store file (default experiments/store/<device>.json)")
    roof.add_argument("--reuse-costs", action="store_true",
                      help="take the step costs from a stored entry of the same target, dtype and drafter shape "
                           "(they do not depend on the drafter's weights) and measure only the acceptance")

    bench = sub.add_parser("bench", help="batch-sweep benchmark of every mode and transformers; JSON + table")
    add_model_args(bench)
    bench.add_argument("--short", action="store_true", help="the `make demo` preset (a few minutes on this CPU)")
    bench.add_argument("--configs", default=None, help="comma-separated from ar,sequential,parallel,flex,hf,hf-lookup")
    bench.add_argument("--batch-sizes", type=int_list, default=None)
    bench.add_argument("--datasets", default=None, help="mtbench,humaneval")
    bench.add_argument("--settings", default=None, help="greedy,sample")
    bench.add_argument("--prompts", type=int, default=None, help="prompts per measurement (at least the batch size)")
    bench.add_argument("--max-new-tokens", type=int, default=None)
    bench.add_argument("--repeats", type=int, default=None)
    bench.add_argument("--verify-threshold", type=float, default=VERIFY_THRESHOLD, help="for the fixed modes")
    bench.add_argument("--out", default=None, help="default reports/<device>/bench.json")

    report = sub.add_parser("report", help="reports/<device>/README.md and plots from the bench and roofline JSONs")
    report.add_argument("--device", default=None, help="device slug (default: this machine)")
    report.add_argument("--bench", default=None, help="default reports/<device>/bench.json")
    report.add_argument("--store", default=None, help="default experiments/store/<device>.json")
    report.add_argument("--kernels", action="append", default=[],
                        help="pytest-benchmark JSON of kernels or decode steps (repeatable)")
    report.add_argument("--out", default=None, help="default reports/<device>")


def load_for_experiments(args):
    """(FlexDraft with a drafter, drafter label). ``default`` falls back to ``untrained``, saying so."""
    from flexdraft.api import FlexDraft
    from kernels import backend

    backend.set_backend(args.backend)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise FlexDraftError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    fd = FlexDraft.load(args.model, args.dtype, device=args.device)
    label = args.drafter
    try:
        fd.drafter = fd.load_drafter(args.drafter, args.block_size)
    except FlexDraftError as exc:
        if args.drafter != "default":
            raise
        print(f"flexdraft: warning: {exc}; using an untrained drafter (acceptance near 1: speculation will not pay)",
              file=sys.stderr)
        fd.drafter, label = fd.load_drafter("untrained", args.block_size), "untrained (no trained default)"
    return fd, label


def load_acceptance(path: str, model, drafter) -> dict:
    from experiments.crossover import acceptance_from_stats, entry_key

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FlexDraftError(f"cannot read acceptance from {path}: {exc}") from None
    if "entries" in data:
        entries = data["entries"]
        entry = entries.get(entry_key(model, drafter)) or (next(iter(entries.values())) if len(entries) == 1 else None)
        if entry is None:
            raise FlexDraftError(f"{path} holds {len(entries)} entries and none for this model and drafter")
        return entry["acceptance"]
    stats = data.get("stats", data)
    if "accept_histogram" not in stats:
        raise FlexDraftError(f"{path}: expected a flex store or a stats JSON with accept_histogram")
    return acceptance_from_stats(stats, drafter.block_size, f"stats JSON {path}")


def command_roofline(args) -> int:
    from experiments.bench import held_out_prompts
    from experiments.crossover import (build_entry, entry_key, measure_acceptance, read_store, reusable_entry,
                                       store_file, write_entry)
    from experiments.provenance import current_slug
    from experiments.roofline import QUICK, Grid, measure_ceilings, measure_costs, shape_dict

    grid = QUICK if args.quick else Grid()
    overrides = {"batches": args.batch_sizes, "tokens": args.tokens, "contexts": args.contexts,
                 "prompt_len": args.prompt_len, "repeats": args.repeats, "max_call_tokens": args.max_call_tokens}
    grid = replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    fd, label = load_for_experiments(args)
    if not args.acceptance and args.acceptance_tokens < 3 * fd.drafter.block_size:
        raise FlexDraftError(f"--acceptance-tokens must be at least 3 x the block size ({3 * fd.drafter.block_size}): "
                             "only steps that verify every draft count")
    model, drafter = fd.model, fd.drafter
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    path = Path(args.store) if args.store else store_file(current_slug(model.device))
    key = entry_key(model, drafter)
    extra = {"model": args.model, "dtype": args.dtype, "drafter": label, "backend": args.backend}
    context = grid.prompt_len + 64
    if args.reuse_costs:
        old_key, old = reusable_entry(read_store(path), key)
        if old is None:
            raise FlexDraftError(f"{path} has no entry for this target, dtype and drafter shape to take costs from; "
                                 "run without --reuse-costs")
        log(f"step costs from {old_key} ({old['provenance']['created']})")
        ceilings, rows, context = old["ceilings"], old["costs"], old["policy"]["context"]
        extra.update(grid=old.get("grid"), costs_from={"key": old_key, **{k: old["provenance"][k] for k in (
            "created", "command", "git_commit")}})
    else:
        log(f"ceilings on {current_slug(model.device)} ...")
        ceilings = measure_ceilings(model.device, model.dtype, quick=args.quick)
        log(f"  {ceilings['bandwidth'] / 1e9:.1f} GB/s copy, {ceilings['peak_flops'] / 1e9:.1f} GFLOP/s GEMM "
            f"({ceilings['gemm_source']})")
        rows = measure_costs(model, drafter, grid, log)
        extra["grid"] = asdict(grid)
    if args.acceptance:
        profile = load_acceptance(args.acceptance, model, drafter)
    else:
        log(f"acceptance on {args.acceptance_prompts} held-out prompts ...")
        profile = measure_acceptance(model, drafter, held_out_prompts(fd, args.acceptance_prompts),
                                     args.acceptance_tokens, fd.stop_ids())
    entry = build_entry(rows, ceilings, profile, shape_dict(model, drafter), context, device=model.device,
                        extra=extra)
    write_entry(path, key, entry)
    print_crossover(entry, file=sys.stdout)
    print(f"wrote {path}")
    return 0


def print_crossover(entry: dict, file=None) -> None:
    file = file or sys.stdout   # looked up per call: a default bound at import misses later redirections
    pred = entry["prediction"]
    print(f"predicted tokens/s (steady-state decoding, context {pred['context']:.0f}; acceptance "
          f"{sum(entry['acceptance']['accepted']) / max(1, len(entry['acceptance']['accepted'])) + 1:.2f} "
          f"tokens per step at full verification)", file=file)
    # 'thresh': the verification threshold each speculative mode is predicted best at
    print(f"{'batch':>6}{'ar':>10}{'sequential':>12}{'thresh':>8}{'parallel':>10}{'thresh':>8}  choice", file=file)
    for b, row in sorted(pred["by_batch"].items(), key=lambda kv: int(kv[0])):
        thresh = {m: "tree" if row[m].get("tree_nodes") else row[m].get("verify_threshold")
                  for m in ("sequential", "parallel")}
        print(f"{int(b):>6}{row['ar']['tokens_per_s']:>10.1f}{row['sequential']['tokens_per_s']:>12.1f}"
              f"{thresh['sequential'] if thresh['sequential'] is not None else '-':>8}"
              f"{row['parallel']['tokens_per_s']:>10.1f}{thresh['parallel'] if thresh['parallel'] is not None else '-':>8}"
              f"  {row['choice']['mode']}", file=file)
    print(f"crossover (sequential never behind parallel from batch): {entry['policy']['crossover_batch']}",
          file=file)


def command_bench(args) -> int:
    from experiments.bench import CONFIGS, DATASETS, SETTINGS, SHORT, BenchConfig, bench_with_setup, print_summary
    from experiments.provenance import REPO, current_slug

    cfg = BenchConfig(**(SHORT if args.short else {}))
    overrides = {"configs": args.configs and names(args.configs, CONFIGS), "batch_sizes": args.batch_sizes,
                 "datasets": args.datasets and names(args.datasets, DATASETS),
                 "settings": args.settings and names(args.settings, tuple(SETTINGS)), "prompts": args.prompts,
                 "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None}, verify_threshold=args.verify_threshold)
    if cfg.max_new_tokens < 1 or cfg.repeats < 1 or cfg.prompts < 1:
        raise FlexDraftError("--max-new-tokens, --repeats and --prompts must be at least 1")
    fd, label = load_for_experiments(args)
    out = Path(args.out) if args.out else REPO / "reports" / current_slug(fd.model.device) / "bench.json"
    result = bench_with_setup(fd, cfg, out, model=args.model, dtype=args.dtype, drafter=label, backend=args.backend,
                              log=lambda m: print(m, file=sys.stderr))
    print_summary(result)
    print(f"wrote {out}")
    return 0


def command_report(args) -> int:
    from experiments.crossover import STORE_DIR
    from experiments.provenance import REPO, current_slug
    from experiments.report import write_report

    slug = args.device or current_slug()
    bench = Path(args.bench) if args.bench else REPO / "reports" / slug / "bench.json"
    store = Path(args.store) if args.store else STORE_DIR / f"{slug}.json"
    out = Path(args.out) if args.out else REPO / "reports" / slug
    if not bench.is_file() and not store.is_file():
        raise FlexDraftError(f"nothing to report for {slug}: no {bench} and no {store}; run `flexdraft roofline` "
                             "and `flexdraft bench` first")
    readme = write_report(bench if bench.is_file() else None, store if store.is_file() else None,
                          [Path(k) for k in args.kernels], out)
    text = readme.read_text()
    if "## Summary" in text:
        print(text.split("## Summary", 1)[1].split("\n## ", 1)[0].strip())
    print(f"wrote {readme}")
    return 0


COMMANDS = {"roofline": command_roofline, "bench": command_bench, "report": command_report}
