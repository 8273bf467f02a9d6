"""FlexDraft GPU check: one prepared command for one GPU (no downloads, no installs; an H100 took 4 min 14 s at
--budget-scale 0.85 in session 20, under its budgets: the stages end early when done).

    experiments/gpu_check.sh                        # everything; results under $OUT (default ./gpu_out)
    python -m experiments.gpu_check --dry-run       # the same pipeline on CPU: interpreter, tiny shapes

Stages, in order, each with its own time budget (a stage that runs out skips what is left of it). The report is
rewritten after every stage, so a run cut short still leaves what it measured.
  1. tests     the kernel tests on the GPU, bf16 and real shapes included (the four files in parallel processes);
  2. autotune  a quick sweep (``autotune.sweep``) written to $OUT/autotune/<device>.json, used by the stages after it;
  3. kernels   each kernel against its torch reference; attention also against SDPA with an explicit boolean mask
               and FlexAttention with a block mask, and against its HBM floor (bytes moved / 4.3e12 B/s);
  4. forward   full decoder steps on random weights at the real shapes of SmolLM2-135M, Llama-3-8B and Qwen3-8B,
               FlexDraft-style (masks enter at the split layer with their own projections), CUDA graphs.
Outputs (five files: the device tool brings back at most eight): $OUT/gpu_check.json (everything, with provenance),
$OUT/gpu_check.md (summary and the project's targets), $OUT/tests.log (the pytest output of every test file),
$OUT/autotune/<device>.json (the tuned store: commit it as autotune/configs/<device>.json), and gpu_check.log from
gpu_check.sh.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The floors' ceilings are measured at start-up (a large copy, a large bf16 GEMM: `experiments.roofline`); these H200
# figures (docs/models-data-hardware.md) stand in for a dry run, or if the measurement fails.
HBM_BYTES_PER_S = 4.3e12    # H200 device-to-device copy
BF16_FLOP_PER_S = 790e12    # H200 dense bf16 matmul
TEST_FILES = ["tests/test_kernel_block_attention.py", "tests/test_kernel_draft_head.py",
              "tests/test_kernel_verify.py", "tests/test_kernel_autotune_store.py", "tests/test_kernel_gpu_check.py",
              "tests/test_train.py", "tests/test_engine_cuda.py"]   # training and decoding on a CUDA device
BUDGETS_S = {"tests": 120, "autotune": 100, "kernels": 130, "forward": 110}   # at most ~8 minutes with start-up

# Targets on the H200 (issue 5)
TARGET_ATTN_FLOOR_PCT, TARGET_ATTN_VS_SDPA = 70.0, 2.0
TARGET_VERIFY_SPEEDUP, TARGET_HEAD_SPEEDUP = 10.0, 1.5


# ---- model shapes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    rank: int = 512          # calibration MLP width
    eps: float = 1e-6


DECODERS = {
    "smollm2-135m": DecoderShape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, rank=256),
    "llama-3-8b": DecoderShape("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
    "qwen3-8b": DecoderShape("qwen3-8b", 36, 4096, 32, 8, 128, 12288, 151936),
    "tiny": DecoderShape("tiny", 3, 48, 4, 2, 16, 96, 300, rank=40),   # --dry-run
}


# ---- run context -----------------------------------------------------------------------------------------------------
class Check:
    """Where results go, how time is measured, and how much of it is left."""

    def __init__(self, out: Path, dry_run: bool, budget_scale: float):
        import torch
        self.out, self.dry_run = out, dry_run
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))   # logs that do not come back one by one
        out.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if dry_run else "cuda"
        self.dtype = torch.float32 if dry_run else torch.bfloat16   # the interpreter has no bf16 tl.dot
        self.budget_scale = budget_scale
        self.hbm_bytes_per_s, self.bf16_flop_per_s, ceilings = measured_ceilings(dry_run)
        self.report: dict = {"provenance": {**provenance(dry_run), "hbm_bytes_per_s": self.hbm_bytes_per_s,
                                            "bf16_flop_per_s": self.bf16_flop_per_s, "ceilings": ceilings},
                             "stages": {}}
        self.stage_start = time.perf_counter()
        self.stage_budget = 0.0
        self._flush = None   # graph_us's L2-flushing buffer, allocated on first use
        self.warmers: list = []   # processes compiling the sweep's configs while the tests run
        self.stages: list[str] = list(STAGES)

    # time
    def start_stage(self, name: str) -> None:
        self.stage_start, self.stage_budget = time.perf_counter(), BUDGETS_S[name] * self.budget_scale
        log(f"== {name} (budget {self.stage_budget:.0f} s)")

    def left(self) -> float:
        return self.stage_budget - (time.perf_counter() - self.stage_start)

    def time_us(self, fn) -> float:
        """Median microseconds of fn: do_bench (L2 flushed between runs) on the GPU, wall clock on the CPU."""
        if self.dry_run:
            fn()
            runs = []
            for _ in range(2):
                t = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t)
            return sorted(runs)[0] * 1e6
        from autotune.sweep import bench_us
        return bench_us(fn, warmup_ms=5, rep_ms=25)

    def graph_us(self, fn, reps: int = 20) -> float | None:
        """Median microseconds of fn alone: CUDA-graph replays of (L2 flush, fn) less replays of the flush alone, so
        neither the host's launch overhead (``time_us`` includes it: ~20-40 us a call on the H100 host) nor a warm
        L2 flatters a small kernel. None on the CPU, or where fn cannot be captured (a host sync inside)."""
        if self.dry_run:
            return None
        import statistics

        import torch
        try:
            if self._flush is None:
                self._flush = torch.empty(128 << 20, dtype=torch.int8, device="cuda")   # > any L2 (50-60 MB)
            flush = self._flush
            graphs = {"both": cuda_graph(lambda: (flush.zero_(), fn()), reps), "flush": cuda_graph(flush.zero_, reps)}
            samples = {name: [] for name in graphs}
            for _ in range(7):   # interleaved: drift falls on both
                for name, graph in graphs.items():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    samples[name].append(start.elapsed_time(end))
            del graphs
            median = {name: statistics.median(ms) for name, ms in samples.items()}
            return max(median["both"] - median["flush"], 0.0) / reps * 1e3
        except Exception as err:   # the host-inclusive time stays; the report shows the gap
            log(f"graph timing unavailable ({type(err).__name__}: {str(err)[:120]})")
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            return None

    # results
    def record(self, stage: str, result) -> None:
        self.report["stages"][stage] = result
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.report["provenance"]["finished"] = now()
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.report))


def cuda_graph(body, reps: int = 1, warmups: int = 1):
    """``body`` captured ``reps`` times over in one CUDA graph, after ``warmups`` calls on a side stream (Triton's
    compiles and the allocator's first allocations may not happen inside a capture)."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            body()
    return graph


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(dry_run: bool) -> dict:
    import torch
    import triton

    from autotune import store
    return {"device": "cpu (dry run, Triton interpreter)" if dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "host": platform.node(), "git_commit": store.git_commit(),
            "command": " ".join([sys.executable, *sys.argv]), "started": now(), "dry_run": dry_run}


def measured_ceilings(dry_run: bool) -> tuple[float, float, str]:
    """(copy bandwidth B/s, bf16 GEMM FLOP/s, where they come from) on this GPU; the H200 constants otherwise."""
    if dry_run:
        return HBM_BYTES_PER_S, BF16_FLOP_PER_S, "H200 constants (dry run)"
    try:
        import torch

        from experiments.roofline import measure_ceilings
        c = measure_ceilings("cuda", torch.bfloat16)
        torch.cuda.empty_cache()
        log(f"ceilings: copy {c['bandwidth'] / 1e12:.2f} TB/s, bf16 GEMM {c['peak_flops'] / 1e12:.0f} TFLOP/s")
        return c["bandwidth"], c["peak_flops"], (f"measured: {c['copy_bytes'] / 1e9:.1f} GB copy, "
                                                 f"{c['gemm_n']}^3 bf16 GEMM, medians of 5")
    except Exception as err:   # the floors are context; the checks must still run
        log(f"ceilings: measurement failed ({type(err).__name__}: {err}); using the H200 constants")
        return HBM_BYTES_PER_S, BF16_FLOP_PER_S, f"H200 constants (measurement failed: {type(err).__name__})"


def _round(x, digits=2):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), digits)


# ---- 1. tests --------------------------------------------------------------------------------------------------------
def stage_tests(check: Check) -> dict:
    """The kernel test files in parallel processes (their Triton compiles overlap); one log, $OUT/tests.log."""
    out = check.scratch
    (check.out / "tests.log").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = {}
    for path in TEST_FILES:
        name = Path(path).stem
        logf = open(out / f"{name}.log", "w")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(ROOT / path)]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT), logf)
    if "autotune" in check.stages and not check.dry_run:
        start_warmers(check, env)
    results = {}
    deadline = time.perf_counter() + check.left()
    for name, (proc, logf) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()   # only the process this stage started
            rc = "timeout"
        logf.close()
        text = (out / f"{name}.log").read_text()
        summary = next((line.strip("= ") for line in reversed(text.splitlines())
                        if " passed" in line or " failed" in line or " error" in line), "no summary")
        results[name] = {"returncode": rc, "summary": summary}
        log(f"tests {name}: {summary} (rc {rc})")
        with open(check.out / "tests.log", "a") as f:
            f.write(f"==== {name} (rc {rc})\n{text}\n")
    return {"files": results, "all_passed": all(r["returncode"] == 0 for r in results.values())}


# ---- 2. autotune -----------------------------------------------------------------------------------------------------
def start_warmers(check: Check, env: dict) -> None:
    """One process per tuned kernel compiles the quick sweep's configs (Triton's disk cache), beside the tests."""
    from autotune.spaces import TUNED_KERNELS
    for kernel in TUNED_KERNELS:
        logf = open(check.scratch / f"warm-{kernel}.log", "w")
        cmd = [sys.executable, "-m", "autotune.sweep", "--warm", "--quick", "--kernels", kernel]
        check.warmers.append((kernel, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT),
                              logf))


def wait_for_warmers(check: Check, timeout_s: float) -> dict:
    deadline, status = time.perf_counter() + timeout_s, {}
    for kernel, proc, logf in check.warmers:
        try:
            status[kernel] = proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()   # only the process this script started; what it compiled stays cached
            status[kernel] = "killed (late)"
        logf.close()
        text = (check.scratch / f"warm-{kernel}.log").read_text()
        if text.strip():
            log(f"autotune: warm-{kernel} said:\n{text[-2000:]}")
    check.warmers = []
    return status


def stage_autotune(check: Check) -> dict:
    from autotune import spaces, store, sweep
    warm = wait_for_warmers(check, 0.5 * check.left()) if check.warmers else {}
    if warm:
        log(f"autotune: compile warmers finished: {warm}")
    if check.dry_run:   # the sweep's machinery on tiny problems; the interpreter never reads a store
        problems = [p for k in spaces.TUNED_KERNELS for p in spaces.problems(k, device="cpu", dtype=check.dtype,
                                                                              tiny=True)]
        entries = sweep.tune(problems, bench=check.time_us, budget_s=check.left(), log=log)
        path = store.write_store(check.out / "autotune" / "dry-run-cpu.json", entries, device="cpu (dry run)",
                                 command="gpu_check --dry-run", merge=False)
    else:
        path = check.out / "autotune" / f"{store.device_slug(store.current_device_name())}.json"
        sweep.run_sweep(path, quick=True, budget_s=check.left(), log=log)
        store.set_store_path(path)   # the benchmarks and forward steps below run the tuned configs
        entries = store.read_store(path)["kernels"]
    rows = [{"kernel": k, "key": key, "shape": e.get("shape"), "config": e["config"], "us": e["us"],
             "default_us": e["default_us"], "gain": _round(e["default_us"] / e["us"])}
            for k, by_key in entries.items() for key, e in by_key.items()]
    return {"store": str(path), "entries": rows, "warmers": warm}


# ---- 3. kernels ------------------------------------------------------------------------------------------------------
def attention_cases(check: Check) -> list[dict]:
    if check.dry_run:
        m = dict(head_dim=16, heads=4, kv_heads=2)
        return [dict(model="tiny", mode=mode, batch=2, cache_len=48, drafts=2, group_size=4, flex=True, **m)
                for mode in ("decode", "sequential", "parallel", "prefill")] + [
            dict(model="tiny", mode="tree", batch=2, cache_len=48, drafts=6, group_size=4, flex=False, **m)]
    cases = []   # flex: also time FlexAttention (each shape costs a torch.compile; the budget decides how many)
    for model, m in (("smollm2-135m", DECODERS["smollm2-135m"]), ("llama-3-8b/qwen3-8b", DECODERS["qwen3-8b"])):
        dims = dict(model=model, head_dim=m.head_dim, heads=m.heads, kv_heads=m.kv_heads, group_size=16)
        for batch in (1, 8, 64):
            cases.append(dict(dims, mode="decode", batch=batch, cache_len=1024, drafts=15, flex=batch == 64))
            cases.append(dict(dims, mode="parallel", batch=batch, cache_len=1024, drafts=7, flex=True))
        for batch in (1, 64):
            cases.append(dict(dims, mode="decode", batch=batch, cache_len=4096, drafts=15, flex=False))
            cases.append(dict(dims, mode="sequential", batch=batch, cache_len=1024, drafts=15, flex=batch == 64))
            cases.append(dict(dims, mode="parallel", batch=batch, cache_len=1024, drafts=15, flex=batch == 1))
            cases.append(dict(dims, mode="tree", batch=batch, cache_len=1024, drafts=15, flex=False))
        cases.append(dict(dims, mode="prefill", batch=4, cache_len=512, drafts=15, flex=False))
    return cases


_FLEX_COMPILED = None


def flex_runner(x: dict, compiled: bool):
    """FlexAttention over [cache prefix ; masks] with the same rules as a mask_mod; returns (make_mask, run)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q = x["q"].transpose(1, 2)
    kv_limit, num_clean, group_size = x["kv_limit"], x["num_clean"], x["group_size"]
    extent = int(kv_limit.max()) + 1
    keys, values = x["k_cache"][:, :, :extent], x["v_cache"][:, :, :extent]
    if x["k_mask"] is not None:
        keys = torch.cat([keys, x["k_mask"].transpose(1, 2)], dim=2)
        values = torch.cat([values, x["v_mask"].transpose(1, 2)], dim=2)
    B, _, T, _ = q.shape

    def mask_mod(b, h, q_idx, kv_idx):
        in_cache = kv_idx < extent
        sees_cache = kv_idx <= kv_limit[b, q_idx]
        sees_mask = (q_idx >= num_clean) & ((q_idx - num_clean) // group_size == (kv_idx - extent) // group_size)
        return torch.where(in_cache, sees_cache, sees_mask)

    global _FLEX_COMPILED
    if compiled and _FLEX_COMPILED is None:
        for knob in ("cache_size_limit", "recompile_limit"):   # one compile per shape, never a silent eager fallback
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    attend = _FLEX_COMPILED if compiled else flex_attention

    def make_mask():
        return create_block_mask(mask_mod, B, None, T, keys.shape[2], device=q.device)

    block_mask = make_mask()
    return make_mask, lambda: attend(q, keys, values, block_mask=block_mask, enable_gqa=True)


def bench_attention(check: Check) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from autotune.spaces import attention_bytes, attention_flops, attention_inputs
    from kernels.block_attention import block_attention_reference, block_attention_triton, visibility
    rows, flex_budget = [], 0.4 * check.left()
    flex_spent = 0.0
    for case in attention_cases(check):
        if check.left() < 0:
            log("kernels: attention budget spent, skipping the rest")
            break
        c = dict(case)
        model, with_flex = c.pop("model"), c.pop("flex")
        x = attention_inputs(c.pop("batch"), c.pop("mode"), dtype=check.dtype, device=check.device, **c)
        B, T = x["q"].shape[:2]
        row = {"model": model, "mode": case["mode"], "batch": B, "cache": case["cache_len"], "query_tokens": T}
        try:
            out = block_attention_triton(**x)
            ref = block_attention_reference(**x)
            row["max_abs_err"] = _round((out.float() - ref.float()).abs().max().item(), 5)
            row["bytes"] = attention_bytes(x)
            row["floor_us"] = _round(row["bytes"] / check.hbm_bytes_per_s * 1e6)
            # the roofline floor also counts the visible pairs' FLOPs: parallel steps at large batch are compute bound
            row["roofline_us"] = _round(max(row["bytes"] / check.hbm_bytes_per_s,
                                             attention_flops(x) / check.bf16_flop_per_s) * 1e6)
            row["triton_us"] = _round(check.time_us(lambda: block_attention_triton(**x)))
            row["triton_graph_us"] = _round(check.graph_us(lambda: block_attention_triton(**x)))
            kernel_us = row["triton_graph_us"] or row["triton_us"]   # the floors are the kernel's
            row["pct_of_floor"] = _round(100 * row["floor_us"] / kernel_us, 1)
            row["pct_of_roofline"] = _round(100 * row["roofline_us"] / kernel_us, 1)
            row["reference_us"] = _round(check.time_us(lambda: block_attention_reference(**x)))
            # SDPA alone with a prebuilt boolean mask and prebuilt [cache ; masks] keys: its best case
            extent = int(x["kv_limit"].max()) + 1
            keys, values = x["k_cache"][:, :, :extent], x["v_cache"][:, :, :extent]
            num_masks = 0 if x["k_mask"] is None else x["k_mask"].shape[1]
            if num_masks:
                keys = torch.cat([keys, x["k_mask"].transpose(1, 2)], dim=2)
                values = torch.cat([values, x["v_mask"].transpose(1, 2)], dim=2)
            allowed = visibility(x["kv_limit"], extent, x["num_clean"], num_masks, x["group_size"], x.get("tree"))
            qt = x["q"].transpose(1, 2)
            def sdpa():
                return F.scaled_dot_product_attention(qt, keys, values, attn_mask=allowed, enable_gqa=True)
            row["sdpa_mask_us"] = _round(check.time_us(sdpa))
            row["sdpa_graph_us"] = _round(check.graph_us(sdpa))
            both = row["triton_graph_us"] and row["sdpa_graph_us"]   # like with like: graph replays, else calls
            row["speedup_vs_sdpa"] = _round(row["sdpa_graph_us"] / row["triton_graph_us"] if both
                                            else row["sdpa_mask_us"] / row["triton_us"])
            row["speedup_vs_reference"] = _round(row["reference_us"] / row["triton_us"])
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        if with_flex and flex_spent < flex_budget and "error" not in row:
            t0 = time.perf_counter()
            try:
                make_mask, run = flex_runner(x, compiled=not check.dry_run)
                row["flex_us"] = _round(check.time_us(run))
                row["flex_block_mask_us"] = _round(check.time_us(make_mask))
                row["speedup_vs_flex"] = _round(row["flex_us"] / row["triton_us"])
            except Exception as err:
                row["flex_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            flex_spent += time.perf_counter() - t0
        log(f"kernels: attention {row}")
        rows.append(row)
        del x
    return rows


def bench_draft_head(check: Check) -> list[dict]:
    from autotune.spaces import MODELS, draft_head_inputs
    from flexdraft.sampling import SamplingParams
    from kernels.draft_head import draft_head_reference, draft_head_triton
    import torch
    if check.dry_run:
        cases = [("tiny", rows, "greedy") for rows in (3, 8)] + [("tiny", 8, "temperature")]
    else:
        cases = [(m, b * 15, "greedy") for m in ("smollm2-135m", "llama-3-8b", "qwen3-8b") for b in (1, 16, 64)]
        cases += [("qwen3-8b", 240, "temperature")]
    out = []
    for model, rows, mode in cases:
        if check.left() < 0:
            break
        m = MODELS[model]
        args, kwargs = draft_head_inputs(rows, hidden=m["hidden"], vocab=m["vocab"], rank=m["rank"], dtype=check.dtype,
                                         device=check.device)
        if mode == "temperature":
            kwargs = dict(params=SamplingParams(temperature=0.8),
                          race_noise=-torch.log(torch.rand(rows, m["vocab"], device=check.device, dtype=torch.float64)))
        row = {"model": model, "rows": rows, "batch": rows // 15, "mode": mode}
        try:
            got, ref = draft_head_triton(*args, **kwargs), draft_head_reference(*args, **kwargs)
            row["token_agreement"] = _round((got[0] == ref[0]).float().mean().item(), 4)
            row["max_prob_err"] = _round((got[2] - ref[2]).abs().max().item(), 5)
            row["triton_us"] = _round(check.time_us(lambda: draft_head_triton(*args, **kwargs)))
            row["reference_us"] = _round(check.time_us(lambda: draft_head_reference(*args, **kwargs)))
            row["speedup"] = _round(row["reference_us"] / row["triton_us"])
            weights = m["vocab"] * (m["hidden"] + m["rank"]) + 2 * m["hidden"] * m["rank"]   # lm_head, w2, w1
            row["floor_us"] = _round(weights * args[0].element_size() / check.hbm_bytes_per_s * 1e6)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        log(f"kernels: draft_head {row}")
        out.append(row)
    return out


def bench_verify(check: Check) -> list[dict]:
    from autotune.spaces import verify_inputs
    from kernels.verify import (verify_greedy_reference, verify_greedy_triton, verify_sampling_reference,
                                verify_sampling_triton)
    if check.dry_run:
        cases = [(300, 1), (300, 9)]
    else:
        cases = [(v, b) for v in (49152, 128256, 151936) for b in (1, 16, 64)]
    out = []
    for vocab, batch in cases:
        if check.left() < 0:
            break
        x = verify_inputs(batch, 15 if not check.dry_run else 5, vocab, device=check.device)
        sampling = (x["draft_tokens"], x["num_drafts"], x["draft_probs"], x["target_probs"], x["uniforms"],
                    x["race_noise"], x["kv_len"])
        greedy = (x["draft_tokens"], x["num_drafts"], x["target_argmax"], x["kv_len"])
        for mode, args, kernel, reference in (("greedy", greedy, verify_greedy_triton, verify_greedy_reference),
                                              ("sampling", sampling, verify_sampling_triton,
                                               verify_sampling_reference)):
            row = {"mode": mode, "vocab": vocab, "batch": batch}
            try:
                row["exact"] = all(bool((a == b).all()) for a, b in zip(kernel(*args), reference(*args)))
                row["triton_us"] = _round(check.time_us(lambda: kernel(*args)))
                row["reference_us"] = _round(check.time_us(lambda: reference(*args)))
                row["speedup"] = _round(row["reference_us"] / row["triton_us"])
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            log(f"kernels: verify {row}")
            out.append(row)
        del x
    return out


def stage_kernels(check: Check) -> dict:
    from kernels import backend
    backend.set_backend("triton")
    total = check.stage_budget
    result = {}
    for name, fn, share in (("block_attention", bench_attention, 0.6), ("draft_head", bench_draft_head, 0.22),
                            ("verify", bench_verify, 0.18)):
        check.stage_start, check.stage_budget = time.perf_counter(), total * share
        result[name] = fn(check)
    return result


# ---- 4. forward steps ------------------------------------------------------------------------------------------------
class RandomDecoder:
    """A decoder with random weights and a model's real shapes, laid out as FlexDraft runs it: clean tokens pass every
    layer with the target weights (their K/V written to the cache); mask tokens enter at the split layer
    (``layers - round(0.28 * layers)``) with their own q/k/v/o copies. Attention is ``kernels.block_attention``
    (the dispatcher), so the active backend decides what runs. No RoPE (elementwise, small next to the rest)."""

    def __init__(self, shape: DecoderShape, *, batch: int, max_len: int, dtype, device, seed: int = 0):
        import torch
        torch.manual_seed(seed)
        self.shape, self.dtype, self.device = shape, dtype, device
        s = shape
        self.split = s.layers - max(1, round(0.28 * s.layers))
        qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim

        def weight(*dims):   # in place: no fp32 temporaries of 8B parameters
            return torch.empty(*dims, dtype=dtype, device=device).normal_(0.0, dims[-1] ** -0.5)

        def norm():
            return torch.ones(s.hidden, dtype=dtype, device=device)

        self.layers = []
        for index in range(s.layers):
            layer = dict(qkv=weight(qkv_out, s.hidden), o=weight(s.hidden, s.heads * s.head_dim),
                         gate_up=weight(2 * s.inter, s.hidden), down=weight(s.hidden, s.inter),
                         attn_norm=norm(), mlp_norm=norm())
            if index >= self.split:   # the drafter's trainable copies
                layer.update(qkv_draft=weight(qkv_out, s.hidden), o_draft=weight(s.hidden, s.heads * s.head_dim))
            self.layers.append(layer)
        self.final_norm = norm()
        self.lm_head = weight(s.vocab, s.hidden)     # tied with the embedding (bonus embeddings come from it)
        self.calibration = (weight(s.rank, 2 * s.hidden), torch.zeros(s.rank, dtype=dtype, device=device),
                            weight(s.vocab, s.rank), torch.zeros(s.vocab, dtype=dtype, device=device))
        cache = (s.layers, batch, s.kv_heads, max_len, s.head_dim)
        self.cache_k = torch.empty(cache, dtype=dtype, device=device).normal_()
        self.cache_v = torch.empty(cache, dtype=dtype, device=device).normal_()

    def weight_bytes(self, clean: bool, masks: bool) -> int:
        """Bytes of weights one step reads: target layers for clean tokens, drafter copies and shared MLPs of the
        tuned layers for masks, lm_head for clean logits, lm_head + calibration for the draft head."""
        total = 0
        for index, layer in enumerate(self.layers):
            uses_target = clean or (masks and index >= self.split)
            if uses_target:
                total += sum(layer[k].numel() for k in ("gate_up", "down", "attn_norm", "mlp_norm"))
            if clean:
                total += layer["qkv"].numel() + layer["o"].numel()
            if masks and index >= self.split:
                total += layer["qkv_draft"].numel() + layer["o_draft"].numel()
        total += self.lm_head.numel() * (int(clean) + int(masks))
        total += sum(t.numel() for t in self.calibration) if masks else 0
        return total * self.lm_head.element_size()

    def step(self, clean, positions, masks, mask_limit, group_size: int, kv_extent: int):
        """clean [B, nc, h] (or None) at cache slots ``positions``; masks [B, M, h] (or None) seeing slots
        <= mask_limit and their own group. Returns the target's argmax at the clean tokens and the drafts of the
        first mask group (its slots 2..group_size through the calibrated draft head)."""
        import torch
        import torch.nn.functional as F

        from kernels.block_attention import block_attention
        from kernels.draft_head import draft_head
        s = self.shape
        B = (clean if clean is not None else masks).shape[0]
        nc = 0 if clean is None else clean.shape[1]
        rows = torch.arange(B, device=self.device)[:, None]
        hidden = clean
        for index, layer in enumerate(self.layers):
            tuned = masks is not None and index >= self.split
            if tuned and index == self.split:
                hidden = masks if hidden is None else torch.cat([hidden, masks], dim=1)
            if hidden is None:   # a draft pass starts at the split layer
                continue
            x = F.rms_norm(hidden, (s.hidden,), layer["attn_norm"], s.eps)
            q_parts, k_mask = [], None
            if nc:
                q, k, v = F.linear(x[:, :nc], layer["qkv"]).split(
                    [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
                self.cache_k[index][rows, :, positions] = k.view(B, nc, s.kv_heads, s.head_dim)
                self.cache_v[index][rows, :, positions] = v.view(B, nc, s.kv_heads, s.head_dim)
                q_parts.append(q)
            if tuned:
                q, k, v = F.linear(x[:, nc:], layer["qkv_draft"]).split(
                    [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
                k_mask = k.reshape(B, -1, s.kv_heads, s.head_dim)
                v_mask = v.reshape(B, -1, s.kv_heads, s.head_dim)
                q_parts.append(q)
            q = torch.cat(q_parts, dim=1) if len(q_parts) > 1 else q_parts[0]
            limits = [positions] if nc else []
            limits += [mask_limit] if tuned else []
            kv_limit = torch.cat(limits, dim=1) if len(limits) > 1 else limits[0]
            attn = block_attention(q.view(B, -1, s.heads, s.head_dim), self.cache_k[index, :B],
                                   self.cache_v[index, :B], kv_limit, k_mask, v_mask if tuned else None, num_clean=nc,
                                   group_size=group_size if tuned else 1, kv_extent=kv_extent)
            attn = attn.reshape(B, -1, s.heads * s.head_dim)
            if tuned:
                outs = [F.linear(attn[:, :nc], layer["o"])] if nc else []
                outs.append(F.linear(attn[:, nc:], layer["o_draft"]))
                out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
            else:
                out = F.linear(attn, layer["o"])
            hidden = hidden + out
            x = F.rms_norm(hidden, (s.hidden,), layer["mlp_norm"], s.eps)
            gate, up = F.linear(x, layer["gate_up"]).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, layer["down"])
        target = drafts = None
        if nc:
            target = F.linear(F.rms_norm(hidden[:, :nc], (s.hidden,), self.final_norm, s.eps), self.lm_head).argmax(-1)
        if masks is not None:
            slots = hidden[:, nc + 1:nc + group_size].reshape(-1, s.hidden)
            bonus = self.lm_head[torch.zeros(slots.shape[0], dtype=torch.long, device=self.device)]
            drafts = draft_head(slots, self.final_norm, s.eps, self.lm_head, bonus, self.calibration)[0]
        return target, drafts


FORWARD_MODES = {   # name: (clean tokens, mask groups); parallel groups are v + 1 for v = clean - 1 drafts
    "decode": (1, 0),          # plain autoregressive step
    "verify-8": (8, 0),        # sequential mode's verify pass, v = 7
    "draft-16": (0, 1),        # sequential mode's draft pass: one block of masks, tuned layers only
    "parallel-8": (8, 8),      # parallel step, v = 7
    "parallel-16": (16, 16),   # parallel step, v = 15: the release's worst case (272 query tokens)
}


def forward_inputs(model: RandomDecoder, batch: int, mode: str, context: int, group_size: int):
    import torch
    s = model.shape
    num_clean, groups = FORWARD_MODES[mode]
    cached = context - (37 * torch.arange(batch, device=model.device)) % (context // 4 + 1)
    positions = cached[:, None] + torch.arange(num_clean, device=model.device)[None, :]
    anchors = (torch.arange(groups, device=model.device).repeat_interleave(group_size) if num_clean
               else torch.zeros(groups * group_size, dtype=torch.long, device=model.device))
    mask_limit = (cached[:, None] + anchors[None, :]) if num_clean else (cached - 1)[:, None] + anchors[None, :]
    clean = torch.randn(batch, num_clean, s.hidden, dtype=model.dtype, device=model.device) if num_clean else None
    masks = (torch.randn(batch, groups * group_size, s.hidden, dtype=model.dtype, device=model.device) * 0.02
             if groups else None)
    kv_extent = int(cached.max()) + max(num_clean, 1)
    return dict(clean=clean, positions=positions, masks=masks, mask_limit=mask_limit, group_size=group_size,
                kv_extent=kv_extent), cached


def time_step(check: Check, fn) -> tuple[float, str]:
    """Microseconds per step: a CUDA graph replay when capture works (no Python launch overhead), else eager."""
    if check.dry_run:
        return check.time_us(fn), "eager"
    import torch
    try:
        graph = cuda_graph(fn, warmups=2)
        us = check.time_us(graph.replay)
        del graph
        return us, "cuda-graph"
    except Exception as err:
        log(f"forward: CUDA graph capture failed ({type(err).__name__}: {str(err)[:120]}); timing eagerly")
        torch.cuda.synchronize()
        return check.time_us(fn), "eager"


def stage_forward(check: Check) -> list[dict]:
    import torch

    from kernels import backend
    group_size = 4 if check.dry_run else 16
    context = 40 if check.dry_run else 1024
    models = ["tiny"] if check.dry_run else ["smollm2-135m", "llama-3-8b", "qwen3-8b"]
    batches = (1, 2) if check.dry_run else (1, 64, 4, 16)   # the extremes first, in case the budget runs out
    modes = list(FORWARD_MODES)
    rows, deadline = [], time.perf_counter() + check.left()
    for n, name in enumerate(models):
        # each model gets an equal share of what is left, so all three are measured
        check.stage_start = time.perf_counter()
        check.stage_budget = (deadline - check.stage_start) / (len(models) - n)
        shape = DECODERS[name]
        max_len = context + 16 * (1 + group_size) + 8
        try:
            model = RandomDecoder(shape, batch=max(batches), max_len=max_len, dtype=check.dtype, device=check.device)
        except Exception as err:
            rows.append({"model": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            continue
        for batch in batches:
            for mode in modes:
                for backend_name in ("triton", "torch"):
                    if check.left() < 0:
                        break
                    # the torch reference only where it is affordable and informative
                    if backend_name == "torch" and (batch > 16 or mode not in ("decode", "parallel-8")):
                        continue
                    backend.set_backend(backend_name)
                    num_clean, groups = FORWARD_MODES[mode]
                    row = {"model": name, "mode": mode, "batch": batch, "backend": backend_name,
                           "query_tokens": num_clean + groups * group_size}
                    try:
                        inputs, cached = forward_inputs(model, batch, mode, context, group_size)
                        with torch.no_grad():
                            us, how = time_step(check, lambda: model.step(**inputs))
                        weight_bytes = model.weight_bytes(num_clean > 0, groups > 0)
                        kv_layers = shape.layers if num_clean else shape.layers - model.split
                        kv_bytes = int((cached + num_clean).sum()) * kv_layers * 2 * shape.kv_heads * shape.head_dim \
                            * model.lm_head.element_size()
                        row.update(ms=_round(us / 1e3, 3), timing=how, weight_gb=_round(weight_bytes / 1e9, 3),
                                   floor_ms=_round((weight_bytes + kv_bytes) / check.hbm_bytes_per_s * 1e3, 3))
                        row["pct_of_floor"] = _round(100 * row["floor_ms"] / row["ms"], 1)
                        row["weights_gb_per_s"] = _round(weight_bytes / (us * 1e-6) / 1e9, 0)
                    except Exception as err:
                        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                        if not check.dry_run:
                            torch.cuda.synchronize()
                    log(f"forward: {row}")
                    rows.append(row)
        del model
        if not check.dry_run:
            torch.cuda.empty_cache()
    backend.set_backend("torch")
    return rows


# ---- summary ---------------------------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[dict]:
    """The issue's H200 targets, checked on what this run measured."""
    out = []
    kernels = report["stages"].get("kernels", {})
    attn = [r for r in kernels.get("block_attention", [])
            if r.get("mode") in ("decode", "parallel") and "speedup_vs_sdpa" in r]
    if attn:
        worst_floor = min(attn, key=lambda r: r["pct_of_floor"])
        out.append({"target": f"attention >= {TARGET_ATTN_FLOOR_PCT:.0f}% of HBM floor (decode/parallel)",
                    "worst": f"{worst_floor['pct_of_floor']}% ({worst_floor['model']} {worst_floor['mode']} "
                             f"b{worst_floor['batch']} cache {worst_floor['cache']})",
                    "met": sum(r["pct_of_floor"] >= TARGET_ATTN_FLOOR_PCT for r in attn), "of": len(attn)})
        worst_sdpa = min(attn, key=lambda r: r["speedup_vs_sdpa"])
        out.append({"target": f"attention >= {TARGET_ATTN_VS_SDPA}x SDPA with mask",
                    "worst": f"{worst_sdpa['speedup_vs_sdpa']}x ({worst_sdpa['model']} {worst_sdpa['mode']} "
                             f"b{worst_sdpa['batch']})",
                    "met": sum(r["speedup_vs_sdpa"] >= TARGET_ATTN_VS_SDPA for r in attn), "of": len(attn)})
    ver = [r for r in kernels.get("verify", []) if r.get("batch") == 64 and "speedup" in r]
    if ver:
        worst = min(ver, key=lambda r: r["speedup"])
        out.append({"target": f"verification >= {TARGET_VERIFY_SPEEDUP:.0f}x reference at batch 64",
                    "worst": f"{worst['speedup']}x ({worst['mode']} V{worst['vocab']})",
                    "met": sum(r["speedup"] >= TARGET_VERIFY_SPEEDUP for r in ver), "of": len(ver)})
    head = [r for r in kernels.get("draft_head", []) if r.get("batch", 0) >= 16 and "speedup" in r]
    if head:
        worst = min(head, key=lambda r: r["speedup"])
        out.append({"target": f"draft head >= {TARGET_HEAD_SPEEDUP}x unfused torch at batch >= 16",
                    "worst": f"{worst['speedup']}x ({worst['model']} rows {worst['rows']} {worst['mode']})",
                    "met": sum(r["speedup"] >= TARGET_HEAD_SPEEDUP for r in head), "of": len(head)})
    return out


def markdown(report: dict) -> str:
    p, st = report["provenance"], report["stages"]
    dry = " (DRY RUN: CPU, interpreter, tiny shapes; the times mean nothing)" if p["dry_run"] else ""
    parts = [f"# FlexDraft GPU check{dry}\n",
             f"- device: {p['device']}; torch {p['torch']}, triton {p['triton']}, CUDA {p['cuda']}",
             f"- commit: {p['git_commit']}; started {p['started']}, finished {p.get('finished')}",
             f"- command: `{p['command']}`",
             f"- HBM floor: bytes moved / {p['hbm_bytes_per_s']:.2e} B/s; roofline floor: max(HBM floor, "
             f"visible-pair FLOPs / {p.get('bf16_flop_per_s', BF16_FLOP_PER_S):.2e} FLOP/s); "
             f"{p.get('ceilings', 'H200 constants')}\n"]
    if st.get("kernels"):
        parts += ["## Targets\n", table(targets(report), ["target", "worst", "met", "of"])]
    if "tests" in st:
        t = st["tests"]
        parts += ["## Tests\n", table([{"file": k, **v} for k, v in t.get("files", {}).items()],
                                      ["file", "summary", "returncode"])]
    if "autotune" in st:
        a = st["autotune"]
        parts += [f"## Autotune (store: `{a.get('store')}`)\n",
                  table(a.get("entries", []), ["kernel", "key", "shape", "us", "default_us", "gain", "config"])]
    if st.get("kernels"):
        k = st["kernels"]
        parts += ["## Block attention (us)\n",
                  "`*_us`: one call, timed by `do_bench` (L2 flushed; below ~40 us that is the host's launch time). "
                  "`*_graph_us`: the kernel alone, CUDA-graph replays less an L2 flush; the floors' percentages and "
                  "the speedup over SDPA use them where both exist.\n", table(k.get("block_attention", []), [
            "model", "mode", "batch", "cache", "query_tokens", "floor_us", "triton_us", "triton_graph_us",
            "pct_of_floor", "roofline_us", "pct_of_roofline", "sdpa_mask_us", "sdpa_graph_us",
            "speedup_vs_sdpa", "flex_us", "speedup_vs_flex", "reference_us", "max_abs_err", "error", "flex_error"])]
        parts += ["## Draft head (us)\n", table(k.get("draft_head", []), [
            "model", "rows", "mode", "floor_us", "triton_us", "reference_us", "speedup", "token_agreement",
            "max_prob_err", "error"])]
        parts += ["## Verification (us)\n", table(k.get("verify", []), [
            "mode", "vocab", "batch", "triton_us", "reference_us", "speedup", "exact", "error"])]
    if "forward" in st:
        parts += ["## Forward steps (random weights, real shapes; ms per step)\n", table(st["forward"], [
            "model", "mode", "batch", "query_tokens", "backend", "ms", "floor_ms", "pct_of_floor", "weight_gb",
            "weights_gb_per_s", "timing", "error"])]
    for name, stage in st.items():
        if isinstance(stage, dict) and "stage_error" in stage:
            parts.append(f"**{name} failed:** {stage['stage_error']}\n")
    return "\n".join(parts)


# ---- main ------------------------------------------------------------------------------------------------------------
STAGES = {"tests": stage_tests, "autotune": stage_autotune, "kernels": stage_kernels, "forward": stage_forward}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="FlexDraft GPU check (see the module docstring)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="results folder ($OUT)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the whole pipeline on CPU under the Triton interpreter with tiny shapes")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage's time budget")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported (kernels imports it)
    sys.path.insert(0, str(ROOT))
    import kernels  # noqa: F401  (first: see kernels/__init__.py)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible; use --dry-run to exercise the pipeline on CPU", file=sys.stderr)
        return 2
    check = Check(Path(args.out).resolve(), args.dry_run, args.budget_scale)
    check.stages = [s for s in args.stages.split(",") if s]
    unknown = set(check.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    log(f"gpu_check: {check.report['provenance']['device']}, results in {check.out}")
    failed = False
    for name in check.stages:
        check.start_stage(name)
        began = time.perf_counter()
        try:
            result = STAGES[name](check)
        except Exception as err:   # one stage failing must not cost the others
            import traceback
            traceback.print_exc()
            result, failed = {"stage_error": f"{type(err).__name__}: {str(err)[:500]}"}, True
        check.record(name, result)
        log(f"== {name} done in {time.perf_counter() - began:.0f} s")
    wait_for_warmers(check, 0)   # a run without the autotune stage must not leave them behind
    tests = check.report["stages"].get("tests")
    failed |= bool(tests) and not tests.get("all_passed", False)
    log(f"gpu_check: wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
