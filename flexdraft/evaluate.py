"""``flexdraft evaluate``: a drafter's acceptance and speed on MT-bench and HumanEval, all modes in one run.

Greedy, batch 1. Configurations run interleaved prompt by prompt (ar, sequential, parallel; parallel with the drafter
alone, without prompt lookup, and that without calibration), so a noisy shared machine slows them alike; each output
is checked against ``ar`` token for token. ``--quick`` runs ``ar``, ``sequential`` and ``parallel`` alone.
Writes ``<out>.json`` (every figure, with provenance) and ``<out>.md``. A whole run takes hours on a CPU, so the
totals so far are kept in ``<out>.progress.json`` after every prompt: the same command, run again after an
interrupt, goes on from the next prompt (on the same commit and device; otherwise it starts over and says why).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from flexdraft.errors import FlexDraftError

# "sequential" verifies trees of drafts (the default, SpecConfig.tree_nodes), "sequential, chain" the likeliest ones.
CONFIGS = {"ar": dict(mode="ar"), "sequential": dict(mode="sequential"),
           "sequential, chain": dict(mode="sequential", tree_nodes=0), "parallel": dict(mode="parallel"),
           "parallel, no lookup": dict(mode="parallel", lookup=False),
           "parallel, no lookup, no calibration": dict(mode="parallel", lookup=False, calibration=False)}
# Enough to compare drafters (acceptance is deterministic, speed is measured against ar) in half the time.
QUICK_CONFIGS = {config: CONFIGS[config] for config in ("ar", "sequential", "parallel")}


def position_acceptance(histogram: list[int]) -> list[float]:
    """P(draft k accepted) for k = 1..: the share of steps that gained more than k tokens (bonus included)."""
    steps = sum(histogram)
    return [sum(histogram[k + 1:]) / steps if steps else 0.0 for k in range(1, len(histogram) - 1)]


def evaluate(fd, datasets: dict[str, list[str]], max_new_tokens: int, log=print, configs: dict = CONFIGS,
             progress: Path | None = None, run_key: dict | None = None) -> dict:
    """Every configuration on every prompt, interleaved prompt by prompt. With ``progress`` (a JSON path), the totals
    are saved there after each prompt and a saved run with the same ``run_key`` is continued, not repeated."""
    from tqdm import tqdm

    from experiments.bench import write_json
    from flexdraft.api import merge_stats
    from flexdraft.batch import Stats

    run_key = {**(run_key or {}), "configs": list(configs), "max_new_tokens": max_new_tokens,
               "datasets": {name: len(prompts) for name, prompts in datasets.items()}}
    saved = load_progress(progress, run_key, log)
    results = {}
    for name, prompts in datasets.items():
        ids = fd.encode(prompts)
        done = saved.get(name, {"prompts_done": 0, "totals": {}, "mismatches": {}})
        totals = {config: Stats(**done["totals"].get(config, {})) for config in configs}
        mismatches = {config: done["mismatches"].get(config, 0) for config in configs}
        if done["prompts_done"] < len(ids):
            fd.generate(prompt_ids=ids[:1], mode="parallel", max_new_tokens=4)  # warm-up
        for index in tqdm(range(done["prompts_done"], len(ids)), desc=name, unit="prompt",
                          initial=done["prompts_done"], total=len(ids)):
            reference = None
            for config, kwargs in configs.items():
                result = fd.generate(prompt_ids=[ids[index]], max_new_tokens=max_new_tokens, **kwargs)
                merge_stats(totals[config], result.stats)
                tokens = result.outputs[0]["token_ids"]
                reference = tokens if reference is None else reference
                mismatches[config] += tokens != reference
            saved[name] = {"prompts_done": index + 1, "mismatches": mismatches,
                           "totals": {config: asdict(s) for config, s in totals.items()}}
            if progress is not None:
                write_json(progress, {"run": run_key, "datasets": saved})
        ar_rate = totals["ar"].tokens_per_s
        results[name] = {config: {"mean_accepted": s.mean_accepted, "tokens_per_s": s.tokens_per_s,
                                  "speedup": s.tokens_per_s / ar_rate if ar_rate else 0.0,
                                  "new_tokens": s.new_tokens, "seconds": s.seconds,
                                  "accept_histogram": s.accept_histogram,
                                  "position_acceptance": position_acceptance(s.accept_histogram),
                                  "timings": s.timings, "outputs_differing_from_ar": mismatches[config],
                                  "prompts": len(ids)}
                         for config, s in totals.items()}
    return results


def load_progress(path: Path | None, run_key: dict, log) -> dict:
    """The per-dataset totals a run with the same key saved in ``path``; {} (and why, in the log) otherwise."""
    if path is None or not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        saved_key, saved = state["run"], state["datasets"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        log(f"{path} is unreadable: starting over")
        return {}
    if saved_key != run_key:
        differing = sorted(k for k in run_key.keys() | saved_key.keys() if run_key.get(k) != saved_key.get(k))
        log(f"{path} holds a run with another {', '.join(differing)}: starting over")
        return {}
    log(f"continuing from {path}: " + ", ".join(f"{name} {d['prompts_done']} prompts" for name, d in saved.items()))
    return saved


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Drafter acceptance and speed: `{meta['drafter']}`", "",
             f"Device: {meta['provenance']['device_name']} ({meta['provenance']['threads']} threads"
             f"{', ' + meta['provenance']['cpu_capability'] if meta['provenance'].get('cpu_capability') else ''}); "
             f"torch {meta['provenance']['versions']['torch']}; commit `{meta['provenance']['git_commit']}`.",
             f"Greedy, batch 1, at most {meta['max_new_tokens']} new tokens, fp32; configurations interleaved "
             "prompt by prompt in one run.", "", f"Command: `{meta['provenance']['command']}`", ""]
    for name, configs in results.items():
        n = next(iter(configs.values()))["prompts"]
        lines += [f"## {name} ({n} prompts)", "",
                  "| configuration | mean accepted length | tokens/s | speedup over ar | outputs differing from ar |",
                  "|---|---|---|---|---|"]
        for config, r in configs.items():
            lines.append(f"| {config} | {r['mean_accepted']:.3f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x "
                         f"| {r['outputs_differing_from_ar']} |")
        par = configs["parallel"]["position_acceptance"]
        lines += ["", "Acceptance per block position (parallel): share of steps whose draft k was accepted.", "",
                  "| draft k | " + " | ".join(str(k) for k in range(1, len(par) + 1)) + " |",
                  "|---|" + "---|" * len(par),
                  "| accepted | " + " | ".join(f"{p:.3f}" for p in par) + " |", ""]
    return "\n".join(lines)


def training_hours(history: list[dict], pause_s: float = 600.0) -> float:
    """Wall time between recorded steps, leaving out gaps over ``pause_s`` (a run stopped and resumed later, often
    in another session): no step or evaluation takes that long."""
    times = [h["time"] for h in history]
    return sum(b - a for a, b in zip(times, times[1:]) if b - a <= pause_s) / 3600


def section_training(state_path: Path, out: Path) -> list[str]:
    """The run behind the drafter: its configuration, corpus and held-out acceptance curve (from ``state.json``)."""
    from experiments.plots import training_curve

    try:
        state = json.loads(state_path.read_text())
        history, config = state["history"], state["config"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise FlexDraftError(f"cannot read the training state {state_path}: {exc}") from None
    plot = training_curve(history, out.parent / f"{out.name}-training.png")
    evals = [h for h in history if "tau" in h]
    hours = training_hours(history)
    lines = ["## Training run", "",
             f"{state['step']} steps in this run ({hours:.1f} h of training), "
             f"{config['sequences_per_step']} sequences x {config['blocks_per_sequence']} blocks per step, "
             f"lr {config['lr']}, position decay {config['position_decay']}, KL weight {config.get('kl_weight', 0.0)}, "
             f"{'the target' if config.get('target_labels') else 'the corpus'}'s tokens as labels, "
             f"seed {config['seed']}, bf16 autocast {config['bf16']}; drafter: "
             f"{state['drafter_config']['num_tuned_layers']} tuned layers, block {state['drafter_config']['block_size']}, "
             f"calibration rank {state['drafter_config']['calibration_rank']}, draft vocabulary "
             f"{state['drafter_config'].get('draft_vocab_size') or 'the whole'} words.", ""]
    if evals:
        lines += ["Held-out figures are teacher-forced on held-out corpus answers, every draft verified: averaged over "
                  "random anchors, and (where recorded) walked from the prompt's end as the engine decodes, which "
                  "lands more steps where drafts miss. The same average on a fixed sample of training answers (where "
                  "recorded) shows how much of it is memorised.", "",
                  "| step | held-out mean accepted length | without calibration | decoding as the engine does "
                  "| on training answers | loss |",
                  "|---|---|---|---|---|---|"]
        recorded = (lambda h, key: format(h[key], ".3f") if key in h else "-")
        lines += [f"| {h['step']} | {h['tau']:.3f} | {h.get('tau_raw', float('nan')):.3f} | {recorded(h, 'tau_walk')} "
                  f"| {recorded(h, 'tau_train')} | {h['loss']:.3f} |" for h in evals]
        lines.append("")
    return lines + [f"![training]({plot.name})", ""]


def run(drafter: str, out: Path, mtbench: int, humaneval: int, max_new_tokens: int, model: str = "default",
        training_state: Path | None = None, device: str = "cpu", quick: bool = False) -> dict:
    from experiments.provenance import provenance
    from flexdraft.api import FlexDraft
    from flexdraft.assets import humaneval_prompts, mtbench_prompts

    fd = FlexDraft.load(model, "float32", drafter, device=device)
    datasets = {}
    if mtbench:
        datasets["MT-bench"] = mtbench_prompts()[:mtbench]
    if humaneval:
        datasets["HumanEval"] = humaneval_prompts()[:humaneval]
    meta = {"drafter": drafter, "drafter_config": fd.drafter.config.__dict__, "max_new_tokens": max_new_tokens,
            "provenance": provenance(fd.model.device)}   # "auto" resolved
    # Totals saved by an interrupted run go on only where the code, the device and the models are the same.
    run_key = {"drafter": drafter, "model": model, "git_commit": meta["provenance"]["git_commit"],
               "device": meta["provenance"]["device_name"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = out.parent / f"{out.name}.progress.json"
    results = evaluate(fd, datasets, max_new_tokens, log=lambda m: print(m, file=sys.stderr),
                       configs=QUICK_CONFIGS if quick else CONFIGS, progress=progress, run_key=run_key)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    text = markdown(results, meta)
    if training_state is not None:
        text += "\n" + "\n".join(section_training(training_state, out))
    out.with_suffix(".md").write_text(text)
    progress.unlink(missing_ok=True)
    print(out.with_suffix(".md").read_text(), file=sys.stderr)
    return results
