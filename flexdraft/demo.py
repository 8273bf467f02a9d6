"""``make demo``, the main job: answers to a few MT-bench prompts, then the short batch-sweep benchmark of every mode
beside transformers, its generated report, and the report's summary table."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

DEMO_DIR = Path("runs") / "demo"   # not the committed reports/: a demo run must not rewrite them


def run_demo(num_prompts: int = 4, max_new_tokens: int = 64, out: Path = DEMO_DIR, bench: dict | None = None) -> int:
    """``bench``: BenchConfig fields replacing the ``SHORT`` preset's (the test runs a tiny sweep)."""
    from experiments.bench import SHORT, BenchConfig, bench_with_setup, print_summary
    from experiments.crossover import store_file
    from experiments.provenance import current_slug
    from experiments.report import write_report
    from flexdraft.api import FlexDraft, shipped_drafter_for
    from flexdraft.assets import mtbench_prompts

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    log("loading the default model (SmolLM2-135M-Instruct) ...")
    fd = FlexDraft.load("default")
    drafter_path = shipped_drafter_for(fd.model)
    fd.drafter = fd.load_drafter(str(drafter_path) if drafter_path else "untrained")
    if drafter_path is None:
        log("flexdraft: warning: no trained drafter ships for this model; the speculative modes use an untrained one")

    prompts = mtbench_prompts()[:num_prompts]
    answers = fd.generate(prompt_ids=fd.encode(prompts), mode="flex", max_new_tokens=max_new_tokens)
    for prompt, answer in zip(prompts, answers.outputs):
        print(f"\n### {prompt}\n{answer['text'].strip()}")

    cfg = BenchConfig(**{**SHORT, **(bench or {})})
    log(f"\nshort benchmark: {', '.join(cfg.configs)} at batch {', '.join(map(str, cfg.batch_sizes))} "
        f"({torch.get_num_threads()} threads)")
    result = bench_with_setup(fd, cfg, out / "bench.json", model="default", dtype="float32",
                              drafter=str(drafter_path or "untrained"), backend="torch", log=log)
    store = store_file(current_slug(fd.model.device))
    readme = write_report(out / "bench.json", store if store.is_file() else None, [], out)
    print()
    print_summary(result)
    print(f"report: {readme}")
    return 0
