"""``make demo``: answer a few MT-bench prompts with the default model and set our speed beside transformers'."""
from __future__ import annotations

import sys

import torch


def run_demo(num_prompts: int = 4, max_new_tokens: int = 64) -> int:
    from flexdraft.api import FlexDraft, resolve_model_path, shipped_drafter_for
    from flexdraft.assets import mtbench_prompts
    from flexdraft.baselines import hf_generate, load_hf_model

    print("loading the default model (SmolLM2-135M-Instruct) ...", file=sys.stderr)
    fd = FlexDraft.load("default")
    drafter_path = shipped_drafter_for(fd.model)
    if drafter_path is not None:
        fd.drafter = fd.load_drafter(str(drafter_path))
    prompts = mtbench_prompts()[:num_prompts]
    prompt_ids = fd.encode(prompts)
    modes = ["ar"] + (["sequential", "parallel"] if fd.drafter is not None else [])
    hf = load_hf_model(resolve_model_path("default"), torch.float32)
    for mode in modes:  # warm-up: first calls build caches and tables that steady state reuses
        fd.generate(prompt_ids=prompt_ids[:1], mode=mode, max_new_tokens=4)
    hf_generate(hf, prompt_ids[:1], 4, fd.stop_ids())
    results = {mode: fd.generate(prompt_ids=prompt_ids, mode=mode, max_new_tokens=max_new_tokens) for mode in modes}
    hf_tokens, hf_seconds = hf_generate(hf, prompt_ids, max_new_tokens, fd.stop_ids())

    best = results[modes[-1]]
    for prompt, out in zip(prompts, best.outputs):
        print(f"\n### {prompt}\n{out['text'].strip()}")
    same = sum(r["token_ids"] == h for r, h in zip(results["ar"].outputs, hf_tokens))
    hf_rate = sum(map(len, hf_tokens)) / hf_seconds
    print(f"\n{'engine':<28}{'tokens/s':>10}{'mean accepted':>15}{'vs transformers':>17}")
    print(f"{'transformers generate':<28}{hf_rate:>10.1f}{1.0:>15.2f}{1.0:>16.2f}x")
    for mode, result in results.items():
        s = result.stats
        print(f"{'flexdraft ' + mode:<28}{s.tokens_per_s:>10.1f}{s.mean_accepted:>15.2f}{s.tokens_per_s / hf_rate:>16.2f}x")
    print(f"\ngreedy outputs identical to transformers: {same} of {len(prompts)} "
          f"(batch 1, fp32, {max_new_tokens} new tokens at most, {torch.get_num_threads()} threads)")
    if drafter_path is None:
        print("no trained drafter ships for this model yet, so only autoregressive decoding ran")
    return 0
