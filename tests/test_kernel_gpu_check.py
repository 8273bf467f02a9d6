"""experiments/gpu_check.py without a GPU: its report builders, and its random-weight decoder agreeing across
backends (the forward timings are only worth something if both backends compute the same step)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_utils import DEVICE  # noqa: E402

from kernels import backend  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "experiments" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_report_and_targets(gpu_check):
    attn = {"model": "m", "mode": "decode", "batch": 64, "cache": 1024, "pct_of_floor": 80.0, "speedup_vs_sdpa": 3.0,
            "triton_us": 10.0}
    report = {"provenance": {"dry_run": True, "device": "cpu", "torch": "x", "triton": "y", "cuda": None,
                             "git_commit": "c", "started": "s", "command": "cmd", "hbm_bytes_per_s": 4.3e12},
              "stages": {"kernels": {"block_attention": [attn, dict(attn, mode="parallel", pct_of_floor=50.0)],
                                     "verify": [{"mode": "greedy", "vocab": 5, "batch": 64, "speedup": 12.0}],
                                     "draft_head": [{"model": "m", "rows": 240, "batch": 16, "mode": "greedy",
                                                     "speedup": 1.2}]},
                         "forward": [{"model": "m", "mode": "decode", "batch": 1, "ms": 1.0}],
                         "autotune": {"stage_error": "RuntimeError: boom"}}}
    met = [(t["met"], t["of"]) for t in gpu_check.targets(report)]
    assert met == [(1, 2), (2, 2), (1, 1), (0, 1)]   # floor, vs SDPA, verification, draft head
    text = gpu_check.markdown(report)
    assert "## Targets" in text and "## Forward steps" in text and "autotune failed" in text


@pytest.mark.parametrize("mode", ["decode", "draft-16", "parallel-8"])
def test_random_decoder_same_step_on_both_backends(gpu_check, mode):
    shape = gpu_check.DECODERS["tiny"]
    dtype = torch.float32
    model = gpu_check.RandomDecoder(shape, batch=2, max_len=40 + 8 * 5 + 8, dtype=dtype, device=DEVICE)
    inputs, _ = gpu_check.forward_inputs(model, 2, mode, 40, group_size=4)
    outputs = {}
    previous = backend.get_backend()
    try:
        for name in ("torch", "triton"):
            backend.set_backend(name)
            cache = model.cache_k.clone(), model.cache_v.clone()
            outputs[name] = model.step(**inputs)
            model.cache_k, model.cache_v = cache   # the same cache for both
    finally:
        backend.set_backend(previous)
    for a, b in zip(outputs["torch"], outputs["triton"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
