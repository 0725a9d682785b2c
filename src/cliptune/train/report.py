"""What a person reads after a run: results.json, summary.md (baseline vs final) and curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cliptune.metrics import headline
from cliptune.train.logging import TRAIN_LOG_FILE, evaluations, read_jsonl
from cliptune.utils.files import atomic_write


def write_results(run_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    evals = evaluations(run_dir)
    epochs = sorted(evals)
    results = {
        "baseline": evals.get(0, {}),
        "final": evals[epochs[-1]] if epochs else {},
        "per_epoch": {str(e): evals[e] for e in epochs},
        **extra,
    }
    with atomic_write(run_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_write(run_dir / "summary.md") as tmp:
        tmp.write_text(summary_markdown(results["baseline"], results["final"], title=run_dir.name))
    plot_curves(run_dir, evals)
    return results


def summary_markdown(baseline: dict[str, dict[str, float]], final: dict[str, dict[str, float]], title: str) -> str:
    lines = [f"# {title}: before and after fine-tuning", ""]
    for name in final or baseline:
        lines += [f"## {name}", "", "| metric | baseline | final | change |", "|---|---:|---:|---:|"]
        before, after = baseline.get(name, {}), final.get(name, {})
        for metric in after or before:
            b, a = before.get(metric), after.get(metric)
            change = f"{a - b:+.2f}" if a is not None and b is not None else ""
            lines.append(f"| {metric} | {_fmt(b)} | {_fmt(a)} | {change} |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def plot_curves(run_dir: Path, evals: dict[int, dict[str, dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    steps = read_jsonl(run_dir / TRAIN_LOG_FILE)
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    for name in sorted({n for per_set in evals.values() for n in per_set}):
        points = [(e, headline(evals[e][name])) for e in sorted(evals) if name in evals[e]]
        points = [(e, v) for e, v in points if v is not None]
        if points:
            ax_eval.plot(*zip(*points), marker="o", label=name)
    ax_eval.set(title="evaluation (mean recall / top-1, %)", xlabel="epoch (0 = before fine-tuning)")
    if evals:
        ax_eval.legend()
    fig.tight_layout()
    with atomic_write(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
