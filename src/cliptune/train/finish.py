"""The end of a run: the final model (EMA weights, LoRA merged), raw weights and adapters, WiSE-FT sweep, report."""

from __future__ import annotations

import copy
from typing import Any

from safetensors.torch import save_file

from cliptune.models import ClipModel, save_model
from cliptune.train.logging import log
from cliptune.train.report import write_results
from cliptune.train.setup import Trainer
from cliptune.tuning.lora import has_lora, lora_state_dict, merge_lora
from cliptune.tuning.wise import INITIAL_FILE, load_initial, plot_sweep, sweep, sweep_markdown
from cliptune.utils.files import atomic_write


def _plain(model: ClipModel) -> ClipModel:
    """The model as its backend knows it: LoRA adapters folded into the weights, so `cliptune.load` reads it."""
    return merge_lora(model) if has_lora(model) else model


def _save_final(trainer: Trainer) -> None:
    run_dir, model = trainer.run_dir, trainer.model
    if trainer.ema is not None:
        # Evaluation used the EMA weights, so they are the model; the raw weights are kept beside them.
        save_model(_plain(copy.deepcopy(model)), run_dir / "model_raw")
        trainer.ema.copy_to(model)
    if has_lora(model):
        with atomic_write(run_dir / "model" / "adapter.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(tmp))
    save_model(_plain(model), run_dir / "model")


def _wise(trainer: Trainer) -> dict[str, Any]:
    """Evaluate (1 - a) * initial + a * fine-tuned for each configured a; curve and table beside the run."""
    initial = load_initial(trainer.run_dir / INITIAL_FILE)
    results = sweep(trainer.model, initial, trainer.cfg.eval.wise_alphas, lambda _: trainer.suite.run(trainer.encoding))
    plot_sweep(results, trainer.run_dir / "wise.png")
    with atomic_write(trainer.run_dir / "wise.md") as tmp:
        tmp.write_text(sweep_markdown(results))
    for alpha, per_set in results.items():
        log.info("WiSE-FT alpha %.2f: %s", alpha, per_set)
    return {str(alpha): per_set for alpha, per_set in results.items()}


def finish(trainer: Trainer, seconds: float) -> dict[str, Any]:
    _save_final(trainer)
    extra: dict[str, Any] = {"run": _run_facts(trainer, seconds)}
    if trainer.cfg.eval.wise_alphas and trainer.suite:
        extra["wise"] = _wise(trainer)
    trainer.log.close()
    return write_results(trainer.run_dir, extra)


def _run_facts(trainer: Trainer, seconds: float) -> dict[str, Any]:
    table = trainer.train_table
    return {
        "steps": trainer.state.step,
        "epochs": trainer.state.epoch,
        "train_images": len(table.images) if table is not None else None,
        "train_captions": table.num_captions if table is not None else None,
        "skipped_images": len(table.skipped) if table is not None else None,
        "skipped_samples": trainer.skipped_samples,
        "seconds_this_session": round(seconds, 1),
        "device": str(trainer.device),
        "precision": trainer.cfg.runtime.precision,
        "trainable_parameters": trainer.trainable_parameters,
    }
