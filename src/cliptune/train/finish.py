"""The end of a run: the final model (the best evaluation's weights, EMA applied, LoRA merged), raw weights and
adapters, the WiSE-FT sweep (and its alpha chosen on validation), the report."""

from __future__ import annotations

import copy
from typing import Any

from safetensors.torch import save_file

from cliptune.config import VALIDATION_SPLIT
from cliptune.data.images import FIRST_NAMED, describe_unreadable
from cliptune.models import ClipModel, save_model
from cliptune.train.checkpoint import load_best
from cliptune.train.logging import epoch_text, log
from cliptune.train.report import write_results
from cliptune.train.setup import Trainer
from cliptune.tuning.lora import has_lora, lora_state_dict, merge_lora
from cliptune.tuning.wise import INITIAL_FILE, apply_alpha, load_initial, plot_sweep, sweep, sweep_markdown
from cliptune.utils.files import atomic_write


def _plain(model: ClipModel) -> ClipModel:
    """The model as its backend knows it: LoRA adapters folded into the weights, so `cliptune.load` reads it."""
    return merge_lora(model) if has_lora(model) else model


def _save_final(trainer: Trainer) -> None:
    run_dir, model = trainer.run_dir, trainer.model
    if trainer.ema is not None:
        # Evaluation used the EMA weights, so they are the model; the raw weights (of the last step) are kept beside.
        save_model(_plain(copy.deepcopy(model)), run_dir / "model_raw")
        trainer.ema.copy_to(model)
    if trainer.selection is not None and trainer.selection.best is not None:
        best = load_best(run_dir / "checkpoints", model)  # the evaluated weights of the selected evaluation
        log.info("model/: weights of epoch %s, step %d (%s)", epoch_text(best["epoch"]), best["step"], best["metric"])
    if has_lora(model):
        with atomic_write(run_dir / "model" / "adapter.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(tmp))
    save_model(_plain(model), run_dir / "model")


def _wise(trainer: Trainer) -> dict[float, dict[str, dict[str, float]]]:
    """Evaluate (1 - a) * initial + a * fine-tuned for each configured a; curve and table beside the run."""
    initial = load_initial(trainer.run_dir / INITIAL_FILE)

    def evaluate(_: Any) -> dict[str, dict[str, float]]:
        return {**trainer.validation.run(trainer.encoding), **trainer.suite.run(trainer.encoding)}

    results = sweep(trainer.model, initial, trainer.cfg.eval.wise_alphas, evaluate)
    plot_sweep(results, trainer.run_dir / "wise.png")
    with atomic_write(trainer.run_dir / "wise.md") as tmp:
        tmp.write_text(sweep_markdown(results))
    return results


def _wise_select(trainer: Trainer, results: dict[float, dict[str, dict[str, float]]]) -> float:
    """eval.wise_select: model/ becomes the alpha that is best on the selection metric (ties: the larger alpha)."""
    selection = trainer.selection
    assert selection is not None
    sign = 1.0 if selection.mode == "max" else -1.0
    alpha = max(results, key=lambda a: (sign * selection.value(results[a]), a))
    apply_alpha(trainer.model, load_initial(trainer.run_dir / INITIAL_FILE), alpha)
    save_model(trainer.model, trainer.run_dir / "model")
    adapter = trainer.run_dir / "model" / "adapter.safetensors"
    if alpha != 1.0 and adapter.exists():
        adapter.unlink()  # the interpolated weights are no longer base + these adapters
    log.info("WiSE-FT: model/ is alpha %g, best on %s", alpha, selection.metric)
    return alpha


def finish(trainer: Trainer, seconds: float) -> dict[str, Any]:
    _save_final(trainer)
    extra: dict[str, Any] = {"run": _run_facts(trainer, seconds)}
    selection = _selection_report(trainer)
    final = None
    if trainer.cfg.eval.wise_alphas and (trainer.suite or trainer.validation):
        wise = _wise(trainer)
        extra["wise"] = {str(alpha): per_set for alpha, per_set in wise.items()}
        if trainer.cfg.eval.wise_select and selection is not None:
            selection["wise_alpha"] = _wise_select(trainer, wise)
            final = wise[selection["wise_alpha"]]
    extra["text_overflow"] = trainer.encoding.overflow_counts()
    trainer.log.close()
    return write_results(trainer.run_dir, extra, selection, final)


def _selection_report(trainer: Trainer) -> dict[str, Any] | None:
    if trainer.selection is None:
        return None
    validation = trainer.validation
    names = [t.name for t in validation.retrieval] + [d.name for d, _ in validation.zeroshot]
    suite = trainer.suite
    reported = [t.name for t in suite.retrieval] + [d.name for d, _ in suite.zeroshot]
    reported += [c.name for c in suite.compositionality]
    return {**trainer.selection.state_dict(), "validation_sets": names, "reported_sets": reported, "wise_alpha": None}


def _run_facts(trainer: Trainer, seconds: float) -> dict[str, Any]:
    table = trainer.train_table
    return {
        "steps": trainer.state.step,
        "epochs": trainer.logged_epoch,
        "train_images": len(table.images) if table is not None else None,
        "train_captions": table.num_captions if table is not None else None,
        "validation_images": next((len(t) for t in trainer.validation.retrieval if t.name == VALIDATION_SPLIT), None),
        "skipped_images": len(table.skipped) if table is not None else None,
        "skipped_samples": trainer.skipped_samples,
        "skipped_first": _skipped_first(trainer),
        "seconds_this_session": round(seconds, 1),
        "device": str(trainer.device),
        "precision": trainer.cfg.runtime.precision,
        "trainable_parameters": trainer.trainable_parameters,
    }


def _skipped_first(trainer: Trainer) -> list[str]:
    """The first few skips, named: images the training table skipped when read, then samples skipped in training."""
    read = [describe_unreadable(p) for p in trainer.train_table.skipped] if trainer.train_table is not None else []
    return (read + trainer.skipped_first)[:FIRST_NAMED]
