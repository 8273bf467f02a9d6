"""Benchmark regressions against a stored per-device baseline (pytest-benchmark), ``make bench-regress``.

    python -m experiments.regress            # compare with benchmarks/<device>/<suite>.json; save it if missing
    python -m experiments.regress --save     # (re)write the baseline, e.g. after an intended change
    python -m experiments.regress --suites decode,kernels     # default on a GPU; decode alone on a CPU

Suites: ``decode`` (tests/bench_decode.py: one decode step per mode) and ``kernels`` (tests/bench_kernels.py: each
kernel against its torch reference). A run fails when a benchmark's minimum is more than 50% slower than the
baseline's. On a shared, noisy machine contention inflates medians (measured here: +110% between identical runs)
far more than minima, while a real regression (an extra sync, copy or launch) moves the minimum too. The same
command runs on a GPU runner, against that GPU's baseline.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.provenance import REPO

SUITES = {"decode": "tests/bench_decode.py", "kernels": "tests/bench_kernels.py"}
FAIL_IF = ("min:50%",)


def pytest_command(suite: str, json_out: Path, baseline: Path | None) -> list[str]:
    command = [sys.executable, "-m", "pytest", SUITES[suite], "--benchmark-only", "-o", "python_functions=bench_*",
               "-p", "no:cacheprovider", "-q", "--benchmark-columns=min,median,iqr,rounds",
               f"--benchmark-json={json_out}"]
    if baseline is not None:
        command += [f"--benchmark-compare={baseline}"] + [f"--benchmark-compare-fail={f}" for f in FAIL_IF]
    return command


def main(argv: list[str] | None = None) -> int:
    from experiments.provenance import current_slug

    parser = argparse.ArgumentParser(prog="python -m experiments.regress", description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write the baseline instead of comparing")
    parser.add_argument("--suites", default=None, help="default: decode on a CPU (the kernels' interpreted CPU "
                        "benchmarks run 2 rounds, too few for a threshold), decode,kernels on a GPU")
    parser.add_argument("--device", default=None, help="baseline device slug (default: this machine's)")
    args = parser.parse_args(argv)
    import torch

    slug = args.device or current_slug("cuda" if torch.cuda.is_available() else "cpu")
    suites = args.suites or ("decode,kernels" if torch.cuda.is_available() else "decode")
    status = 0
    for suite in suites.split(","):
        baseline = REPO / "benchmarks" / slug / f"{suite}.json"
        save = args.save or not baseline.is_file()
        with tempfile.TemporaryDirectory() as tmp:
            out = baseline if save else Path(tmp) / f"{suite}.json"
            baseline.parent.mkdir(parents=True, exist_ok=True)
            print(f"== {suite}: {'saving the baseline' if save else 'comparing with'} "
                  f"{baseline.relative_to(REPO)}", flush=True)
            code = subprocess.run(pytest_command(suite, out, None if save else baseline), cwd=REPO).returncode
        if code != 0:
            print(f"== {suite}: FAILED (exit {code})" + ("" if save else f"; slower than {' or '.join(FAIL_IF)} "
                                                         "of the baseline, or a benchmark failed"), flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
