"""What a person reads after a run: results.json, summary.md (baseline, selected and last) and curves.png."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cliptune.metrics import headline
from cliptune.train.logging import TRAIN_LOG_FILE, Evaluation, epoch_text, evaluations, read_jsonl
from cliptune.utils.files import atomic_write

Results = dict[str, dict[str, float]]


def write_results(
    run_dir: Path, extra: dict[str, Any], selection: dict[str, Any] | None = None, final: Results | None = None
) -> dict[str, Any]:
    """results.json, summary.md and curves.png from metrics.jsonl.

    `selection` (Selection.state_dict() plus the validation and reported set names) says which evaluation's weights
    are model/; "final" holds that evaluation's figures unless `final` (a WiSE-FT alpha's) replaces them.
    """
    evals = evaluations(run_dir)
    by_step = {e.step: e for e in evals}
    last = evals[-1] if evals else None
    best = (selection or {}).get("best")
    chosen = by_step.get(best["step"]) if best else last
    results = {
        "baseline": by_step[0].results if 0 in by_step else {},
        "final": final if final is not None else (chosen.results if chosen else {}),
        "last": last.results if last else {},
        "selection": selection,
        "per_epoch": per_epoch(evals),
        "evaluations": [asdict(e) for e in evals],
        **extra,
    }
    with atomic_write(run_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_write(run_dir / "summary.md") as tmp:
        tmp.write_text(summary_markdown(results, title=run_dir.name))
    plot_curves(run_dir, evals, best["step"] if best else None)
    return results


def per_epoch(evals: list[Evaluation]) -> dict[str, Results]:
    """The last evaluation within each epoch, keyed by the epoch's number: "2" holds the evaluation at epoch 2.0, or
    failing that the last one inside it (1 < epoch < 2); "0" is the baseline."""
    return {str(math.ceil(e.epoch)): e.results for e in evals}


def summary_markdown(results: dict[str, Any], title: str) -> str:
    baseline, final, last = results["baseline"], results["final"], results["last"]
    selection = results.get("selection")
    lines = [f"# {title}: before and after fine-tuning", "", *_selection_lines(selection), ""]
    lines += _skip_lines(results.get("run") or {})
    lines += _overflow_lines(results.get("text_overflow") or [])
    validation = set(selection["validation_sets"]) if selection else set()
    for name in final or last or baseline:
        role = "validation: chose the weights, not a held-out figure" if name in validation else "held-out, reported"
        lines += [f"## {name} ({role})", ""]
        lines += ["| metric | baseline | final (model/) | last | change |", "|---|---:|---:|---:|---:|"]
        before, after, end = baseline.get(name, {}), final.get(name, {}), last.get(name, {})
        for metric in after or end or before:
            b, a, e = before.get(metric), after.get(metric), end.get(metric)
            change = f"{a - b:+.2f}" if a is not None and b is not None else ""
            lines.append(f"| {metric} | {_fmt(b)} | {_fmt(a)} | {_fmt(e)} | {change} |")
        lines.append("")
    return "\n".join(lines)


def _selection_lines(selection: dict[str, Any] | None) -> list[str]:
    if not selection:
        return ["model/ holds the weights at the end of training (no eval set to select on)."]
    best, last = selection["best"], selection["last"]
    lines = [
        f"Selection: `{selection['metric']}` ({selection['mode']}). model/ holds the weights of the best evaluation.",
        "",
        "| | epoch | step | value |",
        "|---|---:|---:|---:|",
    ]
    for label, point in (("selected (model/)", best), ("last", last)):
        if point:
            lines.append(f"| {label} | {epoch_text(point['epoch'])} | {point['step']} | {point['value']:.4g} |")
    lines.append("")
    validation, reported = selection["validation_sets"], selection["reported_sets"]
    lines.append(f"Validation sets (selection, early stopping, WiSE-FT alpha): {', '.join(validation) or 'none'}.")
    lines.append(f"Held-out sets (reported only): {', '.join(reported) or 'none'}.")
    if selection["metric"].split("/")[0] in reported:
        lines.append("Note: the selection metric is on a reported set, so that set's final figures are optimistic.")
    if selection.get("stopped"):
        stop = selection["stopped"]
        lines.append(f"Early stopping at epoch {epoch_text(stop['epoch'])}, step {stop['step']}: {stop['reason']}.")
    if selection.get("wise_alpha") is not None:
        lines.append(f"WiSE-FT: model/ is alpha {selection['wise_alpha']:g}, chosen on `{selection['metric']}`.")
    return lines


def _skip_lines(run: dict[str, Any]) -> list[str]:
    """What the training data lost: images skipped when its table was read, samples skipped while training."""
    read, trained = run.get("skipped_images") or 0, run.get("skipped_samples") or 0
    parts = [f"{read} images skipped when the table was read"] if read else []
    if trained:
        parts.append(f"{trained} samples skipped while training (a sample counts in every epoch that reads it)")
    if not parts:
        return []
    first = "; ".join(run.get("skipped_first") or [])
    line = f"Training data: {', '.join(parts)}; first: {first}. Each is named in a warning; repair or remove them."
    return [line, ""]


def _overflow_lines(counts: list[dict[str, Any]]) -> list[str]:
    """One line per set with captions cut short by the text context (results.json `text_overflow`)."""
    lines = [
        f"- {c['set']}: {c['truncated']} of {c['texts']} captions are longer than the model's text context of "
        f"{c['context_length']} tokens and were cut short (first: {c['first']!r}); shorten them, or use a model "
        "with a longer context"
        for c in counts
        if c["truncated"]
    ]
    return ["Captions cut short:", "", *lines, ""] if lines else []


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def plot_curves(run_dir: Path, evals: list[Evaluation], best_step: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_losses(ax_loss, read_jsonl(run_dir / TRAIN_LOG_FILE))
    for name in dict.fromkeys(n for e in evals for n in e.results):
        points = [(e.step, headline(e.results[name])) for e in evals if name in e.results]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            ax_eval.plot(*zip(*points), marker="o", label=name)
            chosen = [v for s, v in points if s == best_step]
            if chosen:
                ax_eval.plot([best_step], chosen, marker="*", markersize=14, color="black", linestyle="none")
    ax_eval.set(title="evaluation (mean recall / top-1, %; * = selected)", xlabel="step (0 = before fine-tuning)")
    if ax_eval.get_legend_handles_labels()[0]:  # sets without a headline figure (compositionality) draw nothing
        ax_eval.legend()
    fig.tight_layout()
    with atomic_write(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_losses(ax: Any, records: list[dict[str, Any]]) -> None:
    """Every logged loss and loss term per step, the epoch means, and validation losses at evaluations."""
    keys = dict.fromkeys(k for r in records for k in r if k == "loss" or k.startswith("loss/"))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), label=key, linewidth=1)
    means = [(r["step"], r["epoch_mean_loss"]) for r in records if "epoch_mean_loss" in r]
    if means:
        ax.plot(*zip(*means), marker="s", label="epoch mean loss")
    for key in dict.fromkeys(k for r in records for k in r if k.startswith("val_loss/")):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="o", linestyle="--", label=key)
    ax.set(title="loss", xlabel="step", ylabel="loss")
    if records:
        ax.legend(fontsize="small")
