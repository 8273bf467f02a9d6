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
    problems = [p for kernel in kernels for p in spaces.problems(kernel, quick=quick, dtype=dtype)]
    entries = tune(problems, bench=bench_us, budget_s=budget_s, log=log)
    store.write_store(path, entries, device=device, command=f"autotune.sweep.run_sweep(quick={quick})")
    store.clear_cache()
    log(f"autotune: wrote {path}")
    return path


def tune(problems, *, bench=bench_us, budget_s: float | None = None, log=print) -> dict:
    """Time each problem's space with ``bench`` (fn -> us); {kernel: {key: entry}} of the fastest correct configs."""
    start = time.perf_counter()
    entries: dict[str, dict] = {}
    for problem in problems:
        kernel = problem.kernel
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
                results.append((bench(lambda: problem.run(inputs, cfg)), cfg))
            except Exception as err:   # out of shared memory / registers: not a candidate here
                log(f"autotune: {kernel} {problem.key} {cfg}: {type(err).__name__}: {str(err)[:120]}")
        if not results:
            continue
        best_us, best = min(results, key=lambda r: r[0])
        default_us = bench(lambda: problem.run(inputs, default_config(kernel, inputs)))
        entries.setdefault(kernel, {})[problem.key] = {
            "config": best, "us": round(best_us, 2), "default_us": round(default_us, 2),
            "shape": problem.describe, "tried": len(results)}
        log(f"autotune: {kernel:16s} {problem.key:28s} best {best_us:9.1f} us (default {default_us:9.1f} us) "
            f"{best}  [{problem.describe}]")
        del inputs, ref
    return entries


def warm(kernels=spaces.TUNED_KERNELS, *, quick: bool = False, dtype: torch.dtype = torch.bfloat16,
         log=print) -> int:
    """Launch every config of the sweep once, untimed, so that Triton's on-disk cache holds their binaries.
    Run it in other processes ahead of ``run_sweep`` (experiments/gpu_check.py does, beside the tests): compiling
    is most of a sweep's time and processes compile in parallel. Returns the number of configs that failed."""
    failed = 0
    for kernel in kernels:
        for problem in spaces.problems(kernel, quick=quick, dtype=dtype):
            inputs = problem.make()
            for cfg in problem.space:
                try:
                    problem.run(inputs, cfg)
                except Exception as err:
                    failed += 1
                    log(f"warm: {kernel} {problem.key} {cfg}: {type(err).__name__}: {str(err)[:120]}")
            del inputs
    torch.cuda.synchronize()
    return failed


def default_config(kernel: str, inputs) -> dict:
    """The fixed config a kernel runs when the store has no entry (what a tuned entry is compared with)."""
    from kernels import block_attention, draft_head, verify
    if kernel == "block_attention":
        q = inputs["q"]
        return block_attention.default_config(q.shape[1] * q.shape[2] // inputs["k_cache"].shape[1], q.shape[-1])
    if kernel == "draft_head":
        return draft_head.default_config(inputs[0][0].shape[0])
    return verify.default_config(inputs["target_probs"].shape[-1])


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="autotune the FlexDraft Triton kernels on this GPU")
    parser.add_argument("--out", default=None, help="store file (default autotune/configs/<device>.json)")
    parser.add_argument("--quick", action="store_true", help="small spaces, fewer shapes")
    parser.add_argument("--kernels", default=",".join(spaces.TUNED_KERNELS))
    parser.add_argument("--warm", action="store_true", help="only compile every config (fills Triton's cache)")
    args = parser.parse_args()
    kernels = tuple(k for k in args.kernels.split(",") if k)
    if args.warm:
        raise SystemExit(1 if warm(kernels, quick=args.quick) else 0)
    run_sweep(args.out, kernels=kernels, quick=args.quick)
