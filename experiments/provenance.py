"""Where a measurement was made: the device and its slug, library versions, thread count, git commit and command.

Every results file of ``experiments/`` carries ``provenance()``; the device slug names per-device files
(``experiments/store/<slug>.json``, ``reports/<slug>/``, ``benchmarks/<slug>/``).
"""
from __future__ import annotations

import datetime
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

from autotune.store import device_slug, git_commit

REPO = Path(__file__).resolve().parent.parent


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows; see ``plain_cpu_name``."""
    name = platform.processor() or platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1]
                break
    except OSError:
        pass
    return plain_cpu_name(name)


def plain_cpu_name(name: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'Intel Xeon': trademark marks and the word 'Processor' only make the slug long."""
    return " ".join(re.sub(r"\((?:R|TM)\)|\bProcessor\b", " ", name, flags=re.IGNORECASE).split()) or "unknown"


def device_name(device: str | torch.device = "cpu") -> str:
    """'NVIDIA H200' for a CUDA device; 'cpu AMD EPYC AVX2' for the CPU. The CPU's vector capability is part of its
    name because two hosts both called 'AMD EPYC' differed 400x in bf16 GEMM speed (AVX512-BF16 vs AVX2 only): their
    stores, reports and baselines must not share a file."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return f"cpu {cpu_model_name()} {torch.backends.cpu.get_cpu_capability()}"


def current_slug(device: str | torch.device = "cpu") -> str:
    """'cpu-amd-epyc-avx2', 'nvidia-h200': the name of this device's files."""
    return device_slug(device_name(device))


def versions() -> dict:
    import transformers
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["flexdraft" if sys.argv[0].endswith(("flexdraft", "__main__.py"))
                                              else sys.argv[0], *sys.argv[1:]])


def provenance(device: str | torch.device = "cpu", command: str | None = None) -> dict:
    return {"device": current_slug(device), "device_name": device_name(device), "versions": versions(),
            "threads": torch.get_num_threads(), "git_commit": git_commit(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command if command is not None else command_line()}
