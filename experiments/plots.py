"""The report's figures (matplotlib, Agg backend): each function draws one PNG from plain rows and returns its path."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"ar": "#555555", "sequential": "#1f77b4", "parallel": "#d62728", "flex": "#2ca02c", "hf": "#9467bd",
          "hf-lookup": "#8c564b"}
MARKERS = {"target": "o", "draft": "s", "head": "^", "prefill": "D", "step_ar": "x", "step_sequential": "v",
           "step_parallel": "P", "loop": ".", "lookup": ","}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _batch_axis(ax, batches) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(batches))
    ax.set_xticklabels([str(b) for b in sorted(batches)])
    ax.set_xlabel("batch size")
    ax.grid(alpha=0.3)


def _panels(groups: list, width: float = 5.0):
    fig, axes = plt.subplots(1, len(groups), figsize=(width * len(groups), 3.8), squeeze=False)
    return fig, axes[0]


def per_config_vs_batch(summary: list[dict], value: str, ylabel: str, path: Path,
                        baseline: float | None = None) -> Path:
    """One panel per (setting, data set), a line per configuration: ``value`` against batch size."""
    groups = list(dict.fromkeys((r["setting"], r["dataset"]) for r in summary))
    fig, axes = _panels(groups)
    for ax, (setting, dataset) in zip(axes, groups):
        rows = [r for r in summary if (r["setting"], r["dataset"]) == (setting, dataset) and r[value] is not None]
        for config in dict.fromkeys(r["config"] for r in rows):
            pts = sorted((r["batch_size"], r[value]) for r in rows if r["config"] == config)
            ax.plot(*zip(*pts), marker="o", label=config, color=COLORS.get(config))
        if baseline is not None:
            ax.axhline(baseline, color="black", lw=0.8, ls=":")
        _batch_axis(ax, {r["batch_size"] for r in rows})
        ax.set_ylabel(ylabel)
        ax.set_title(f"{dataset}, {setting}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def crossover(by_batch: dict, crossover_batch: int | None, choices: dict, path: Path) -> Path:
    """Predicted steady-state tokens/s per mode against batch size, flex's choice marked, the crossover drawn."""
    batches = sorted(int(b) for b in by_batch)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in ("ar", "sequential", "parallel"):
        ax.plot(batches, [by_batch[b][mode]["tokens_per_s"] for b in batches], label=mode, color=COLORS[mode])
    chosen = [(b, by_batch[b][choices[b]]["tokens_per_s"]) for b in batches if b in choices]
    ax.scatter(*zip(*chosen), s=22, color=COLORS["flex"], zorder=3, label="flex's choice")
    if crossover_batch is not None:
        ax.axvline(crossover_batch, color="black", ls="--", lw=0.8)
        ax.annotate(f"crossover: batch {crossover_batch}", (crossover_batch, ax.get_ylim()[1] * 0.92), fontsize=8)
    _batch_axis(ax, [b for b in batches if b & (b - 1) == 0])
    ax.set_ylabel("predicted tokens/s")
    ax.set_title("predicted decoding throughput")
    ax.legend(fontsize=8)
    return _save(fig, path)


def predicted_vs_measured(rows: list[dict], path: Path) -> Path:
    """Per mode: predicted tokens/s (line) and measured median (markers) against batch size."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for config in dict.fromkeys(r["config"] for r in rows):
        pts = sorted((r["batch_size"], r["predicted"], r["measured"]) for r in rows if r["config"] == config)
        b, pred, meas = zip(*pts)
        ax.plot(b, pred, ls="--", color=COLORS.get(config), label=f"{config} predicted")
        ax.plot(b, meas, ls="", marker="o", color=COLORS.get(config), label=f"{config} measured")
    _batch_axis(ax, {r["batch_size"] for r in rows})
    ax.set_ylabel("tokens/s")
    ax.set_title("predicted vs measured (greedy)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def acceptance(curve: list[float], accepted: list[int], histograms: dict, path: Path) -> Path:
    """Left: accepted drafts at full verification (the profile) and accepted(v). Right: tokens gained per step, per
    mode, in the benchmark."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    block = len(curve) + 1
    if accepted:
        axes[0].hist(accepted, bins=range(block + 1), density=True, alpha=0.6, label="accepted of all B_s - 1")
    axes[0].plot(range(1, block), curve, marker="o", color="black", label="mean accepted verifying v")
    axes[0].set_xlabel("drafts (v)")
    axes[0].set_title("acceptance profile (held-out prompts, greedy)")
    axes[0].legend(fontsize=8)
    for mode, hist in histograms.items():
        total = sum(hist) or 1
        axes[1].plot(range(len(hist)), [h / total for h in hist], marker="o", label=mode, color=COLORS.get(mode))
    axes[1].set_xlabel("tokens gained per step (bonus included)")
    axes[1].set_ylabel("share of steps")
    axes[1].set_title("benchmark steps")
    if histograms:
        axes[1].legend(fontsize=8)
    return _save(fig, path)


def roofline(points: list[dict], ceilings: dict, path: Path) -> Path:
    """Attained FLOP/s against arithmetic intensity, log-log, with the bandwidth and compute floors."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    intensities = [p["intensity"] for p in points]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    ridge = ceilings["peak_flops"] / ceilings["bandwidth"]
    xs = sorted({lo, hi, ridge})
    ax.plot(xs, [min(ceilings["peak_flops"], ceilings["bandwidth"] * x) for x in xs], color="black",
            label=f"floors: {ceilings['bandwidth'] / 1e9:.0f} GB/s, {ceilings['peak_flops'] / 1e9:.0f} GFLOP/s")
    for op in dict.fromkeys(p["op"] for p in points):
        sel = [p for p in points if p["op"] == op]
        ax.scatter([p["intensity"] for p in sel], [p["flop_s"] for p in sel], marker=MARKERS.get(op, "o"), s=22,
                   label=op)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attained FLOP/s")
    ax.set_title("roofline")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def training_curve(history: list[dict], path: Path) -> Path:
    """Training loss (running mean over 25 steps) and held-out mean accepted length, against the step."""
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    smooth = [sum(losses[max(0, i - 24): i + 1]) / len(losses[max(0, i - 24): i + 1]) for i in range(len(losses))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, losses, color="#bbbbbb", lw=0.6, label="per step")
    left.plot(steps, smooth, color="#d62728", label="running mean (25)")
    left.set_xlabel("step")
    left.set_ylabel("calibrated cross-entropy (slots 2..B)")
    left.legend()
    evals = [h for h in history if "tau" in h]
    right.plot([h["step"] for h in evals], [h["tau"] for h in evals], "o-", color="#d62728", label="calibrated")
    right.plot([h["step"] for h in evals], [h.get("tau_raw") for h in evals], "s--", color="#1f77b4",
               label="without calibration")
    walked = [h for h in evals if "tau_walk" in h]
    if walked:
        right.plot([h["step"] for h in walked], [h["tau_walk"] for h in walked], "^-", color="#2ca02c",
                   label="calibrated, decoding as the engine does")
    seen = [h for h in evals if "tau_train" in h]
    if seen:
        right.plot([h["step"] for h in seen], [h["tau_train"] for h in seen], "o:", color="#7f7f7f",
                   label="calibrated, on training answers")
    right.set_xlabel("step")
    right.set_ylabel("held-out mean accepted length")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(fig, path)
