"""The engine on a lent GPU with the real default model: `flexdraft roofline` (this GPU's flex store), then
`flexdraft bench`, within one device call's time.

The model travels as in `experiments.gpu_train` (its GGUF, compressed, in parts: one device call each, within the
30 s the machine stays warm between calls), with the MT-bench and HumanEval prompts (the GPU machine has no wheels).

    python -m experiments.gpu_bench prepare                  # here: .gpu_payload/1..N, and the calls to make
    python3 -m experiments.gpu_bench run --payload /tmp/payload --minutes 6   # there, in the last call

The acceptance profile comes from this repository's CPU store (the drafter drafts the same tokens on any device;
measuring it again would cost the GPU minutes); the step costs are measured there. What comes back, under $OUT:
gpu_bench.json (provenance, what each step did and how long), the flex store, the bench JSONs and the log.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from experiments.gpu_train import PAYLOAD, ROOT, log, model_payload, pack_calls, print_calls, start_run, supervised

EVAL_DATA = ("mtbench", "humaneval")
ACCEPTANCE_FROM = ROOT / "experiments" / "store" / "cpu-intel-xeon-avx512.json"
# (name, share of the benches' time, extra bench arguments): batch 16 is issue 6's target; batch 1 with fewer prompts
# (each runs alone) and transformers' prompt lookup, which only runs there.
BENCHES = (("bench-batched", 0.55, ["--batch-sizes", "16,4,32", "--prompts", "32", "--repeats", "3",
                                    "--configs", "ar,sequential,parallel,flex,hf"]),
           ("bench-batch1", 0.45, ["--batch-sizes", "1", "--prompts", "8", "--repeats", "2",
                                   "--configs", "ar,sequential,parallel,flex,hf,hf-lookup"]))


def prepare(out: Path, call_mib: float | None = None) -> list[Path]:
    from flexdraft.api import FlexDraft
    from flexdraft.assets import cache_dir, humaneval_prompts, mtbench_prompts

    shutil.rmtree(out, ignore_errors=True)
    staging = out / "staging"
    staging.mkdir(parents=True)
    manifest = model_payload(staging, FlexDraft.load("default", "float32"))
    mtbench_prompts(), humaneval_prompts()   # extracted into the cache if they were not
    small = [staging / "model-files.tar.xz"]
    for name in EVAL_DATA:
        shutil.copy(cache_dir() / "data" / f"{name}.jsonl", staging / f"{name}.jsonl")
        small.append(staging / f"{name}.jsonl")
    return pack_calls(out, staging, small, manifest, call_mib)


def run(payload: Path, out: Path, minutes: float, dry_run: bool = False, threads: int | None = None) -> dict:
    """``threads``: torch's CPU threads for both commands (default torch's: 16 on the H100 host; session 20's bench
    repetitions disagreed up to 6x there, and whether the host's threads are why is the next run's question)."""
    began = time.time()
    deadline = began + 60 * minutes
    device, logfile, summary = start_run("gpu_bench", payload, out, minutes, dry_run)
    summary["threads"] = threads
    from flexdraft.assets import cache_dir

    def write_summary():
        summary["seconds"] = round(time.time() - began, 1)
        (out / "gpu_bench.json").write_text(json.dumps(summary, indent=1))

    (cache_dir() / "data").mkdir(parents=True, exist_ok=True)
    for name in EVAL_DATA:
        shutil.copy(payload / f"{name}.jsonl", cache_dir() / "data" / f"{name}.jsonl")
    write_summary()

    py = [sys.executable, "-m", "flexdraft"]
    common = ["--device", device, "--dtype", "float32" if dry_run else "bfloat16"]
    common += ["--threads", str(threads)] if threads else []
    store = out / "flex-store.json"
    roofline = ["--quick"] if dry_run else ["--batch-sizes", "1,2,4,8,16,32", "--tokens", "1,2,4,8,16",
                                            "--repeats", "3"]
    step_began = time.time()
    summary["steps"]["roofline"] = supervised(
        py + ["roofline", *common, "--acceptance", str(ACCEPTANCE_FROM), "--store", str(store), *roofline],
        0.2 * (deadline - time.time()), logfile)
    summary["steps"]["roofline_s"] = round(time.time() - step_began, 1)
    write_summary()
    # flex reads this GPU's policy (else the conservative default, which it says)
    env_store = {"FLEXDRAFT_FLEX_STORE": str(store)} if store.is_file() else {}
    bench_budget = deadline - time.time() - 15
    for name, share, extra in BENCHES:
        if dry_run:   # a batch's worth of prompts per data set
            batch = "2" if name == "bench-batched" else "1"
            extra = ["--batch-sizes", batch, "--prompts", batch, "--repeats", "1", "--configs", "ar,parallel,flex",
                     "--max-new-tokens", "8"]
        step_began = time.time()
        seconds = bench_budget * share if name != BENCHES[-1][0] else deadline - time.time() - 15
        summary["steps"][name] = supervised(
            py + ["bench", *common, "--datasets", "mtbench,humaneval", "--settings", "greedy",
                  "--max-new-tokens", "64", *extra, "--out", str(out / f"{name}.json")], seconds, logfile, env_store)
        summary["steps"][f"{name}_s"] = round(time.time() - step_began, 1)
        write_summary()
    log(f"done in {round(time.time() - began)} s; files in {out}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: write the payload, one folder per device call")
    p.add_argument("--out", default=str(PAYLOAD))
    r = sub.add_parser("run", help="on the GPU: rebuild the target, roofline, bench")
    r.add_argument("--payload", required=True)
    r.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    r.add_argument("--minutes", type=float, default=6.0, help="the whole run, from start to files written")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads for roofline and bench")
    r.add_argument("--dry-run", action="store_true", help="on the CPU, tiny grids")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print_calls(prepare(Path(args.out)), "python3 -m experiments.gpu_bench run --payload /tmp/payload --minutes 6")
    else:
        run(Path(args.payload), Path(args.out), args.minutes, args.dry_run, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
