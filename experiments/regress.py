"""Benchmark regressions against a stored per-device baseline (pytest-benchmark), ``make bench-regress``.

    python -m experiments.regress            # compare with benchmarks/<device>/<suite>.json; save it if missing
    python -m experiments.regress --save     # (re)write the baseline from 3 runs, e.g. after an intended change
    python -m experiments.regress --suites decode,kernels     # default on a GPU; decode alone on a CPU

Suites: ``decode`` (tests/bench_decode.py: one decode step per mode) and ``kernels`` (tests/bench_kernels.py: each
kernel against its torch reference). A run fails when a benchmark's minimum is more than 50% slower than the
baseline's. On a shared, noisy machine contention inflates medians (measured here: +110% between identical runs)
far more than minima, while a real regression (an extra sync, copy or launch) moves the minimum too. A baseline
keeps, per benchmark, the slowest of a few runs' minima (``--runs``): one run's minimum can be a lucky one the host
rarely reaches again; and a compare fails only if it fails twice in a row. The same command runs on a GPU runner,
against that GPU's baseline.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.provenance import REPO

SUITES = {"decode": "tests/bench_decode.py", "kernels": "tests/bench_kernels.py"}
FAIL_IF = ("min:50%",)
SAVE_RUNS = 3
# A compare that fails is run once more, and the suite fails only if both do: a real regression slows every run,
# while this host's slow spells can hold a whole run (Ice Lake host, session 32: 1 compare in 3 failed against a
# baseline of 3 runs' slowest minima, `parallel` at batch 8 at 6.3 ms where its runs' minima were 3.9-4.1).
COMPARE_TRIES = 2


def slowest_minima(runs: list[dict]) -> dict:
    """One baseline from several pytest-benchmark JSONs: the first run's, with each benchmark's stats taken from
    the run whose minimum was slowest. Ice Lake host (session 31): a one-run baseline saved `ar` at batch 8 at
    1.52 ms, and the next compares measured 2.53 / 2.93 ms, over the 50% bar with nothing changed."""
    named = [{b["fullname"]: b for b in run["benchmarks"]} for run in runs]
    slowest = [max((n[b["fullname"]] for n in named if b["fullname"] in n), key=lambda x: x["stats"]["min"])
               for b in runs[0]["benchmarks"]]
    return {**runs[0], "benchmarks": slowest}


def pytest_command(suite: str, json_out: Path, baseline: Path | None) -> list[str]:
    command = [sys.executable, "-m", "pytest", SUITES[suite], "--benchmark-only", "-o", "python_functions=bench_*",
               "-p", "no:cacheprovider", "-q", "--benchmark-columns=min,median,iqr,rounds",
               f"--benchmark-json={json_out}"]
    if baseline is not None:
        command += [f"--benchmark-compare={baseline}"] + [f"--benchmark-compare-fail={f}" for f in FAIL_IF]
    return command


def save_baseline(suite: str, baseline: Path, runs: int) -> int:
    from experiments.bench import write_json   # atomic: an interrupt keeps the old baseline

    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{suite}-{i}.json" for i in range(runs)]
        for out in outs:
            code = subprocess.run(pytest_command(suite, out, None), cwd=REPO).returncode
            if code != 0:
                return code
        write_json(baseline, slowest_minima([json.loads(out.read_text()) for out in outs]))
    return 0


def compare(suite: str, baseline: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(COMPARE_TRIES):
            if attempt:
                print(f"== {suite}: slower than the baseline; measuring once more", flush=True)
            code = subprocess.run(pytest_command(suite, Path(tmp) / f"{suite}-{attempt}.json", baseline),
                                  cwd=REPO).returncode
            if code == 0:
                return 0
    return code


def main(argv: list[str] | None = None) -> int:
    from experiments.provenance import current_slug

    parser = argparse.ArgumentParser(prog="python -m experiments.regress", description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write the baseline instead of comparing")
    parser.add_argument("--suites", default=None, help="default: decode on a CPU (the kernels' interpreted CPU "
                        "benchmarks run 2 rounds, too few for a threshold), decode,kernels on a GPU")
    parser.add_argument("--runs", type=int, default=SAVE_RUNS, help="runs a saved baseline takes the slowest "
                        "minimum of, per benchmark (default %(default)s)")
    parser.add_argument("--device", default=None, help="baseline device slug (default: this machine's)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    import torch

    slug = args.device or current_slug("cuda" if torch.cuda.is_available() else "cpu")
    suites = args.suites or ("decode,kernels" if torch.cuda.is_available() else "decode")
    status = 0
    for suite in suites.split(","):
        baseline = REPO / "benchmarks" / slug / f"{suite}.json"
        save = args.save or not baseline.is_file()
        print(f"== {suite}: {f'saving the baseline ({args.runs} runs)' if save else 'comparing with'} "
              f"{baseline.relative_to(REPO)}", flush=True)
        code = save_baseline(suite, baseline, args.runs) if save else compare(suite, baseline)
        if code != 0:
            print(f"== {suite}: FAILED (exit {code})" + ("" if save else f"; slower than {' or '.join(FAIL_IF)} "
                                                         "of the baseline twice, or a benchmark failed"), flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
