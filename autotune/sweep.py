"""Time every config of each kernel's space on this CUDA GPU and write the per-device store.

    from autotune.sweep import run_sweep
    run_sweep()                       # -> autotune/configs/<device-slug>.json
    run_sweep("out.json", quick=True) # a small space and fewer shapes (what experiments/gpu_check.py runs)

Each config is checked against the torch reference before it is timed (a wrong config is dropped, never stored).
Timings are medians of ``triton.testing.do_bench`` (which flushes L2 between runs).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from autotune import spaces, store
from kernels.backend import interpreting


def bench_us(fn, warmup_ms: int = 10, rep_ms: int = 40) -> float:
    """Median time of ``fn`` in microseconds on the current CUDA device."""
    import triton.testing
    try:
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except TypeError:   # older triton: no return_mode
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
        ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return float(ms) * 1e3


def outputs_match(kernel: str, out, ref) -> bool:
    """Loose check that a config computes the kernel's function (the tests hold the exact tolerances)."""
    if kernel == "block_attention":
        return bool(torch.allclose(out.float(), ref.float(), atol=3e-2, rtol=3e-2))
    if kernel == "draft_head":   # low-precision near-ties may flip a few argmaxes; the confidences must agree
        same = (out[0] == ref[0]).float().mean().item()
        return same >= 0.95 and bool(torch.allclose(out[2], ref[2], atol=2e-2, rtol=5e-2))
    return all(torch.equal(a, b) for a, b in zip(out, ref))


def run_sweep(out_path: str | Path | None = None, *, kernels=spaces.TUNED_KERNELS, quick: bool = False,
              dtype: torch.dtype = torch.bfloat16, budget_s: float | None = None, log=print) -> Path:
    """Tune ``kernels`` on this GPU and write the store (``out_path``, default ``autotune/configs/<device>.json``).

    Returns the path written. Raises RuntimeError without a CUDA GPU or under TRITON_INTERPRET=1. ``budget_s`` stops
    starting new problems once spent (what was measured is still written).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("autotuning needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                           "kernels use their default configs until a store for this device exists")
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter cannot time kernels; unset it to autotune")
    device = store.current_device_name()
    path = Path(out_path) if out_path is not None else store.CONFIG_DIR / f"{store.device_slug(device)}.json"
    start = time.perf_counter()
    entries: dict[str, dict] = {}
    for kernel in kernels:
        for problem in spaces.problems(kernel, quick=quick, dtype=dtype):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                log(f"autotune: budget of {budget_s:.0f} s spent; stopping before {kernel} {problem.key}")
                break
            inputs = problem.make()
            ref = problem.reference(inputs)
            results = []
            for cfg in problem.space:
                try:
                    if not outputs_match(kernel, problem.run(inputs, cfg), ref):
                        log(f"autotune: {kernel} {problem.key} {cfg}: WRONG RESULT, dropped")
                        continue
                    results.append((bench_us(lambda: problem.run(inputs, cfg)), cfg))
                except Exception as err:   # out of shared memory / registers: not a candidate here
                    log(f"autotune: {kernel} {problem.key} {cfg}: {type(err).__name__}: {str(err)[:120]}")
            if not results:
                continue
            best_us, best = min(results, key=lambda r: r[0])
            default_us = _default_us(kernel, problem, inputs)
            entries.setdefault(kernel, {})[problem.key] = {
                "config": best, "us": round(best_us, 2), "default_us": round(default_us, 2),
                "shape": problem.describe, "tried": len(results)}
            log(f"autotune: {kernel:16s} {problem.key:28s} best {best_us:9.1f} us (default {default_us:9.1f} us) "
                f"{best}  [{problem.describe}]")
            del inputs, ref
    store.write_store(path, entries, device=device, command=f"autotune.sweep.run_sweep(quick={quick})")
    store.clear_cache()
    log(f"autotune: wrote {path}")
    return path


def _default_us(kernel: str, problem, inputs) -> float:
    """Time of the fixed default config (what runs when the store has no entry)."""
    from kernels import block_attention, draft_head, verify
    if kernel == "block_attention":
        x = inputs
        rows = x["q"].shape[1] * x["q"].shape[2] // x["k_cache"].shape[1]
        cfg = block_attention.default_config(rows, x["q"].shape[-1])
    elif kernel == "draft_head":
        cfg = draft_head.default_config(inputs[0][0].shape[0])
    else:
        cfg = verify.default_config(inputs["target_probs"].shape[-1])
    return bench_us(lambda: problem.run(inputs, cfg))


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="autotune the FlexDraft Triton kernels on this GPU")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run_sweep(args.out, quick=args.quick)
