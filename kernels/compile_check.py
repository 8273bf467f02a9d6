"""Compile every Triton kernel variant for a CUDA target on a machine without a GPU (triton ships ptxas).

The interpreter accepts things the compiler rejects (and the reverse); this catches compiled-mode errors and
reports each variant's shared memory against the device limit, with no GPU:

    python -m kernels.compile_check             # default configs, every constexpr variant, sm_90 (H100/H200)
    python -m kernels.compile_check --space     # also every config of the autotune spaces (slow)

Runs with TRITON_INTERPRET=0 whatever the environment says (it must run in its own process).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"   # before triton decorates anything: compiled kernels, not interpreted ones

import argparse  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import triton  # noqa: E402

SMEM_LIMIT = 232448   # bytes of shared memory one block may use on sm_90 (227 KiB)
PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def _signature(fn, pointers: dict, floats=(), constexprs: dict | None = None) -> tuple[dict, dict]:
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(pointers)
    sig.update({name: "fp32" for name in floats})
    constexprs = constexprs or {}
    sig.update({name: "constexpr" for name in constexprs})
    return sig, constexprs


def variants(space: bool = False):
    """(label, kernel name, pointers, floats, constexprs, options) for every variant a launch can produce."""
    from autotune import spaces
    from kernels import block_attention as attn
    from kernels import draft_head as head
    from kernels import verify

    for dtype, D, masks, split in itertools.product(("bfloat16", "float16", "float32"), (64, 128), (False, True),
                                                    (False, True)):
        cfgs = [attn.default_config(1, D), attn.default_config(1088, D)]
        if space and dtype == "bfloat16":
            cfgs += spaces.attention_space(1088, D) + spaces.attention_space(4, D)
        for cfg in {tuple(sorted(c.items())): c for c in cfgs}.values():
            p = PTR[dtype]
            yield (f"block_attention {dtype} D{D} masks={masks} split={split} {cfg}", "_block_attention_kernel",
                   dict(Q=p, K=p, V=p, KM=p, VM=p, O=p, LIM="*i64", O_PART="*fp32", LSE_PART="*fp32"),
                   ("qk_scale",),
                   dict(D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=D, HAS_MASKS=masks,
                        SPLIT=split, IEEE=dtype == "float32"),
                   dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        yield (f"merge_splits {dtype} D{D}", "_merge_splits_kernel",
               dict(O_PART="*fp32", LSE_PART="*fp32", O=PTR[dtype]), (),
               dict(D=D, BLOCK_M=16, BLOCK_D=D), dict(num_warps=4, num_stages=2))

    for dtype, calib in itertools.product(("bfloat16", "float16", "float32"), (False, True)):
        p = PTR[dtype]
        cfgs = [head.default_config(15), head.default_config(960)]
        if space and dtype == "bfloat16":
            cfgs += spaces.draft_head_space(960)
        for cfg in {tuple(sorted(c.items())): c for c in cfgs}.values():
            yield (f"norm_calibration {dtype} calib={calib} {cfg}", "_norm_calibration_kernel",
                   dict(H=p, NW=p, EMB=p, W1=p, B1=p, NORMED=p, ACT=p), ("eps",),
                   dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_R=64, BLOCK_K=cfg["BLOCK_K"], HAS_CALIB=calib,
                        IEEE=dtype == "float32"), dict(num_warps=4, num_stages=2))
            for write, scale in ((False, False), (True, True), (True, False)):
                yield (f"vocab_tile {dtype} calib={calib} write={write} scale={scale} {cfg}", "_vocab_tile_kernel",
                       dict(NORMED=p, ACT=p, LM=p, W2=p, B2=p, LOGITS="*fp32", PART_M="*fp32", PART_S="*fp32",
                            PART_I="*i32"), ("temperature",),
                       dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"], HAS_CALIB=calib,
                            WRITE_LOGITS=write, SCALE=scale, IEEE=dtype == "float32"),
                       dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    for sample, fp64 in ((False, False), (True, False), (True, True)):
        yield (f"merge_vocab sample={sample} noise_fp64={fp64}", "_merge_vocab_kernel",
               dict(PART_M="*fp32", PART_S="*fp32", PART_I="*i32", PROBS="*fp32",
                    NOISE="*fp64" if fp64 else "*fp32", TOKENS="*i64", TOKEN_PROB="*fp32", MAX_PROB="*fp32"), (),
               dict(BLOCK_T=1024, BLOCK_V=1024, SAMPLE=sample, NOISE_FP64=fp64), dict(num_warps=4, num_stages=2))

    ints = dict(DRAFTS="*i64", NUM_DRAFTS="*i64", KV_LEN="*i64", TOKENS="*i64", ACCEPT_LEN="*i64", NEW_KV_LEN="*i64")
    yield ("verify_greedy", "_verify_greedy_kernel", dict(ints, TARGET_ARGMAX="*i64"), (), dict(BLOCK=16),
           dict(num_warps=1, num_stages=2))
    cfgs = [verify.default_config(151936)] + (spaces.verify_sampling_space() if space else [])
    for cfg in cfgs:
        for u64, p64 in ((True, False), (False, False), (True, True)):
            w64 = p64
            yield (f"verify_sampling u/noise fp64={u64} probs fp64={p64} {cfg}", "_verify_sampling_kernel",
                   dict(ints, Q="*fp64" if p64 else "*fp32", P="*fp64" if p64 else "*fp32",
                        U="*fp64" if u64 else "*fp32", NOISE="*fp64" if u64 else "*fp32"), (),
                   dict(BLOCK=16, BLOCK_V=cfg["BLOCK_V"], PROD_FP64=u64 or p64, CMP_FP64=u64 or p64, W_FP64=w64,
                        SCORE_FP64=u64 or w64),
                   dict(num_warps=cfg["num_warps"], num_stages=2))


KERNEL_MODULES = {"_block_attention_kernel": "kernels.block_attention",
                  "_merge_splits_kernel": "kernels.block_attention",
                  "_norm_calibration_kernel": "kernels.draft_head", "_vocab_tile_kernel": "kernels.draft_head",
                  "_merge_vocab_kernel": "kernels.draft_head", "_verify_greedy_kernel": "kernels.verify",
                  "_verify_sampling_kernel": "kernels.verify"}


def compile_one(job) -> tuple[str, str, int]:
    label, name, pointers, floats, constexprs, options, arch = job
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(KERNEL_MODULES[name]), name)
    sig, consts = _signature(fn, pointers, floats, constexprs)
    try:
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:   # report every failure, not only the first
        return label, f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}", 0
    shared = int(getattr(kernel.metadata, "shared", 0))
    return label, "ok" if shared <= SMEM_LIMIT else "TOO MUCH SHARED MEMORY", shared


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", action="store_true", help="also compile every autotune config")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    jobs = [(*v, args.arch) for v in variants(args.space)]
    start, failed = time.perf_counter(), 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for label, status, shared in pool.map(compile_one, jobs):
            failed += status != "ok"
            print(f"{status:8s} smem {shared:6d}  {label}", flush=True)
    print(f"{len(jobs)} variants, {failed} failed, {time.perf_counter() - start:.0f} s (sm_{args.arch}, triton "
          f"{triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
