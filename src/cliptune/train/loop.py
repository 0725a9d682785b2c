"""The fine-tuning loop: train epoch by epoch, evaluate (with EMA weights) and checkpoint at the configured cadence,
keep the best evaluated weights, stop early if asked, and finish the run."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cliptune.config import RunConfig
from cliptune.data import DataError, Skip
from cliptune.data.images import FIRST_NAMED
from cliptune.losses import MAX_LOGIT_SCALE
from cliptune.losses.objective import Dense
from cliptune.models.base import ENCODERS
from cliptune.models.checkpoints import checkpoint_folder, latest_checkpoint
from cliptune.train.checkpoint import save_best, save_checkpoint, set_rng_state
from cliptune.train.data import make_loader
from cliptune.train.distributed import barrier, broadcast_object
from cliptune.train.finish import finish
from cliptune.train.forward import Batch
from cliptune.train.gradcache import chunked_backward
from cliptune.train.guard import owned_run
from cliptune.train.logging import epoch_text, log
from cliptune.train.runs import DONE, FAILED, INTERRUPTED, session_ended, session_started
from cliptune.train.setup import Callback, Trainer, build_trainer
from cliptune.tuning.locking import set_train_mode, trainable_summary
from cliptune.tuning.wise import initial_state
from cliptune.utils.precision import autocast


def _call(trainer: Trainer, kind: str, *inputs: torch.Tensor) -> Any:
    """One forward through what DDP wraps (so a multi-process backward synchronises), under the run's precision."""
    with autocast(trainer.device, trainer.cfg.runtime.precision):
        return trainer.forward(kind, *inputs)


def _chunked(trainer: Trainer, batch: Batch) -> torch.Tensor:
    """GradCache: the loss of the whole batch with the activation memory of one chunk."""
    model, objective, ddp = trainer.model, trainer.objective, trainer.ddp
    towers = [t for t in ENCODERS if t not in trainer.locked and (t == "image" or objective.uses_text)]
    return chunked_backward(
        model,
        batch.images,
        batch.texts,
        lambda image, text, _: objective(model, image, text if objective.uses_text else None, batch.extras),
        trainer.cfg.train.chunk_size,
        encode_image=lambda x: trainer.forward("image", x),
        encode_text=lambda x: trainer.forward("text", x),
        no_sync=ddp.no_sync if ddp is not None else None,
        forward_context=lambda: autocast(trainer.device, trainer.cfg.runtime.precision),
        towers=towers,
    )


def _backward(trainer: Trainer, batch: Batch) -> torch.Tensor:
    """Loss and gradients of one contrastive batch, in chunks (GradCache) when it exceeds train.chunk_size."""
    model, objective = trainer.model, trainer.objective
    chunk = trainer.cfg.train.chunk_size
    if chunk is not None and chunk < len(batch):
        return _chunked(trainer, batch)
    if objective.needs_tokens:
        loss = objective.dense(model, Dense(*_call(trainer, "dense", batch.images, batch.texts)), batch.extras)
    elif objective.uses_text:
        image, text = _call(trainer, "pair", batch.images, batch.texts)
        loss = objective(model, image, text, batch.extras)
    else:
        loss = objective(model, _call(trainer, "image", batch.images), None, batch.extras)
    if torch.isfinite(loss):
        loss.backward()
    return loss.detach()


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the last epoch checkpoint is kept and the message says what to change."""


def _last_good(trainer: Trainer) -> str:
    found = latest_checkpoint(checkpoint_folder(trainer.run_dir)) if trainer.where.main else None
    return f"the last good checkpoint is {found}" if found else "no checkpoint had been written yet"


def train_step(trainer: Trainer, batch: Batch) -> float:
    cfg, model = trainer.cfg, trainer.model
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = _backward(trainer, batch)
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"training stopped: the loss is {loss.item()} at step {trainer.state.step + 1} (epoch "
            f"{trainer.state.epoch + 1}); nothing of this epoch was saved, {_last_good(trainer)}. Lower optim.lr "
            "(or optim.lr_image / optim.lr_text), set optim.grad_clip, or use runtime.precision fp32, then resume "
            "with --resume (config changes need a new `name`)"
        )
    if cfg.optim.grad_clip is not None:
        params = [p for p in trainer.module.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    trainer.optimizer.step()
    trainer.scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    if trainer.ema is not None:
        trainer.ema.update(model)
    trainer.state.step += 1
    return loss.item()


def _epoch_iterator(trainer: Trainer, epoch: int) -> tuple[DataLoader, Iterator[Any]]:
    """The epoch's loader and its batches from `state.batch` on; on resume, the saved RNG state is applied where the
    saved run stood."""
    start = trainer.state.batch  # > 0 only in the epoch a mid-epoch checkpoint resumes
    loader = make_loader(trainer.cfg, trainer.dataset, epoch, trainer.where, start)
    rng, trainer.resume_rng = trainer.resume_rng, None
    # Starting a loader draws its seed from the global RNG: at an epoch boundary the saved run drew it after saving,
    # mid-epoch before, so the saved state goes in before or after that draw.
    if rng is not None and start == 0:
        set_rng_state(rng)
    batches = iter(loader)
    if rng is not None and start > 0:
        set_rng_state(rng)
    if trainer.train_table is None:  # a stream cannot seek: read the batches the saved run had trained on
        batches = itertools.islice(batches, start, None)
    return loader, itertools.islice(batches, trainer.steps_per_epoch - start)


def _batches(trainer: Trainer, epoch: int) -> Iterator[Batch]:
    fields = getattr(trainer.dataset, "fields", ("image", "tokens"))
    loader, batches = _epoch_iterator(trainer, epoch)
    # Every local batch is full (drop_last, or one batch holding the whole set), so a short one lost unreadable
    # images; counting here rather than in the dataset also works when worker processes do the loading.
    expected = loader.batch_size or loader.batch_sampler.local_size
    # A stream stops at the step count every rank reaches (shards split unevenly); a table's loader is that long.
    kept = read = 0
    for batch in batches:
        trainer.state.batch += 1
        got = len(batch[0]) if batch else 0
        kept, read = kept + got, read + expected
        _count_skips(trainer, expected - got, batch.skipped)
        if got < 2 and not trainer.where.distributed:  # a contrastive step needs at least one negative
            continue
        if not batch:  # one process cannot skip a step the others take: their collectives would wait forever
            raise RuntimeError(
                f"every image of this process's batch at step {trainer.state.step} failed to load (see the warnings "
                "above); remove or repair those files and resume with --resume"
            )
        out = Batch.from_columns(fields, batch, trainer.device)
        if trainer.mixup is not None:  # the images' new labels are soft targets: class shares summing to 1
            first = loader.batch_sampler.local_offset
            out.images, out.targets = trainer.mixup(out.images, out.group, trainer.state.step, first)
        if trainer.cfg.runtime.channels_last:
            out.images = out.images.contiguous(memory_format=torch.channels_last)
        yield out
    if read and not kept:
        raise DataError(
            f"every one of the {read} training samples read in epoch {epoch + 1} was skipped (first: "
            f"{trainer.skipped_first[0] if trainer.skipped_first else 'see the warnings above'}); fix the training "
            "data (for shards: the images, or data.shard_caption_key)"
        )


def _count_skips(trainer: Trainer, count: int, skipped: tuple[Skip, ...]) -> None:
    """Count a batch's skipped samples and keep the first few names for the run's report (results.json, summary.md)."""
    trainer.skipped_samples += count
    for skip in skipped:
        if len(trainer.skipped_first) < FIRST_NAMED and str(skip) not in trainer.skipped_first:
            trainer.skipped_first.append(str(skip))


def train_epoch(trainer: Trainer, epoch: int) -> None:
    """One epoch (the rest of it after a mid-epoch resume), evaluating and checkpointing on the step cadence."""
    cfg = trainer.cfg
    set_train_mode(trainer.model, trainer.locked)
    bar = tqdm(
        total=trainer.steps_per_epoch,
        initial=trainer.state.batch,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        disable=not cfg.runtime.progress or not trainer.where.main,
        dynamic_ncols=True,
        leave=True,
    )
    started, seen = time.perf_counter(), 0
    for batch in _batches(trainer, epoch):
        loss = train_step(trainer, batch)
        total, count = trainer.epoch_loss
        trainer.epoch_loss = (total + loss, count + 1)
        seen += len(batch) * trainer.where.size
        rate = seen / max(time.perf_counter() - started, 1e-9)
        lr = trainer.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", refresh=False)
        bar.update()
        if trainer.state.step % cfg.runtime.log_every == 0 or trainer.state.step == trainer.total_steps:
            trainer.log.train_step(
                {
                    "step": trainer.state.step,
                    "epoch": trainer.logged_epoch,
                    "loss": loss,
                    "lr": lr,
                    "logit_scale": math.exp(trainer.model.logit_scale.item()),
                    "samples_per_s": rate,
                    **{key: value.item() for key, value in trainer.objective.logged.items()},
                }
            )
        if _mid_epoch(trainer):
            break
    bar.close()


def _mid_epoch(trainer: Trainer) -> bool:
    """Step-cadence evaluation and checkpoint inside an epoch (its end has its own); True when training must stop."""
    cfg, step = trainer.cfg, trainer.state.step
    if trainer.state.batch >= trainer.steps_per_epoch:
        return False
    evaluated = bool(cfg.eval.every_steps) and step % cfg.eval.every_steps == 0 and _evaluates(trainer)
    if evaluated:
        evaluate(trainer)
        set_train_mode(trainer.model, trainer.locked)  # evaluation leaves every module in train mode, locked included
    stop = evaluated and stopped(trainer)
    if stop:
        _checkpoint(trainer)  # records the stop, so a --resume finishes instead of training on
    elif cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
        _checkpoint(trainer)
    if evaluated:
        _run_callbacks(trainer)
    return stop


def _run_callbacks(trainer: Trainer) -> None:
    """The callbacks (a sweep's pruning) run at each epoch's end and after each mid-epoch evaluation, so they see
    every evaluation during training, once the checkpoint due with it is written."""
    for callback in trainer.callbacks:
        callback(trainer)


def _evaluates(trainer: Trainer) -> bool:
    return bool(trainer.suite) or bool(trainer.validation)


def stopped(trainer: Trainer) -> bool:
    return trainer.selection is not None and trainer.selection.stopped is not None


def _eval_due_at_epoch_end(trainer: Trainer) -> bool:
    """eval.every_epochs (default: every epoch unless eval.every_steps is set), a step-cadence step, or the end."""
    cfg, epoch, step = trainer.cfg, trainer.state.epoch, trainer.state.step
    if not _evaluates(trainer) or trainer.last_eval_step == step:
        return False
    every_epochs = cfg.eval.every_epochs or (None if cfg.eval.every_steps else 1)
    by_epoch = every_epochs is not None and epoch % every_epochs == 0
    by_step = cfg.eval.every_steps is not None and step % cfg.eval.every_steps == 0
    return by_epoch or by_step or epoch == cfg.train.epochs


def _end_epoch(trainer: Trainer, epoch: int) -> None:
    """Close epoch `epoch` (0-based): its mean loss, evaluation if due, and its checkpoint."""
    trainer.state.epoch, trainer.state.batch = epoch + 1, 0
    total, count = trainer.epoch_loss
    if count:
        mean = {"step": trainer.state.step, "epoch": trainer.logged_epoch, "epoch_mean_loss": total / count}
        trainer.log.train_step(mean)
    trainer.epoch_loss = (0.0, 0)
    if _eval_due_at_epoch_end(trainer):
        evaluate(trainer)
    _checkpoint(trainer)
    _run_callbacks(trainer)


def evaluated_weights(trainer: Trainer) -> contextlib.AbstractContextManager:
    """The weights evaluation and export use: the EMA average when there is one, else the raw weights."""
    return trainer.ema.applied(trainer.model) if trainer.ema is not None else nullcontext()


def evaluate(trainer: Trainer, baseline: bool = False) -> dict[str, dict[str, float]]:
    """Every eval set, on the main process (the others wait for it, then learn whether training stops)."""
    trainer.last_eval_step = trainer.state.step
    results = {}
    if trainer.where.main:
        try:
            results = _evaluate(trainer, baseline)
        finally:
            barrier(trainer.where)
    else:
        barrier(trainer.where)
    if trainer.selection is not None and trainer.where.distributed:
        trainer.selection.load_state_dict(broadcast_object(trainer.selection.state_dict(), trainer.where))
    return results


def _log_validation_losses(trainer: Trainer, results: dict[str, dict[str, float]]) -> None:
    """The loss of every retrieval set (validation and held-out) goes to train.jsonl (and TensorBoard's train/) as
    `val_loss/SET`, beside the training loss."""
    losses = {f"val_loss/{name}": values["loss"] for name, values in results.items() if "loss" in values}
    if losses:
        trainer.log.train_step({"step": trainer.state.step, "epoch": trainer.logged_epoch, **losses})


def _evaluate(trainer: Trainer, baseline: bool) -> dict[str, dict[str, float]]:
    selection, state, epoch = trainer.selection, trainer.state, trainer.logged_epoch
    with evaluated_weights(trainer):
        # Validation sets also report their loss (selectable: SET/loss with mode min). Held-out sets keep to recalls
        # in the results; their loss only goes to the training log, beside the validation sets'.
        validation = trainer.validation.run(trainer.encoding, loss_batch=trainer.cfg.train.batch_size)
        reported = trainer.suite.run(trainer.encoding, loss_batch=trainer.cfg.train.batch_size)
        held_out = {name: {"loss": values.pop("loss")} for name, values in reported.items() if "loss" in values}
        results = {**validation, **reported}
        if selection is not None and baseline:
            selection.value(results)  # a selection metric that does not exist fails before training, not after
        elif selection is not None and selection.update(results, epoch, state.step):
            record = {"epoch": epoch, "step": state.step, "metric": selection.metric, "results": results}
            save_best(trainer.run_dir / "checkpoints", initial_state(trainer.model), record)
    trainer.log.evaluation(epoch, state.step, results)
    _log_validation_losses(trainer, {**validation, **held_out})
    for name, values in results.items():
        shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
        log.info("eval %s (epoch %s, step %d): %s", name, epoch_text(epoch), state.step, shown)
    if selection is not None and not baseline and selection.best is not None:
        best = selection.best
        shown = epoch_text(best.epoch)
        log.info("selection %s: best %.4g (epoch %s, step %d)", selection.metric, best.value, shown, best.step)
    if selection is not None and selection.stopped is not None:
        reason = selection.stopped["reason"]
        log.warning("early stopping at epoch %s, step %d: %s", epoch_text(epoch), state.step, reason)
    return results


def _checkpoint(trainer: Trainer) -> None:
    if trainer.cfg.train.keep_checkpoints == 0:
        return
    if not trainer.where.main:
        barrier(trainer.where)
        return
    try:
        save_checkpoint(trainer)
    finally:
        barrier(trainer.where)


def fit(trainer: Trainer, callbacks: tuple[Callback, ...] = ()) -> dict[str, Any]:
    """Baseline evaluation, then epochs of training with evaluations and atomic checkpoints at the configured cadence;
    callbacks run after each epoch's checkpoint and after every mid-epoch evaluation (`_run_callbacks`). status.json
    says how the session ended (`cliptune runs`)."""
    trainer.callbacks = callbacks
    if not trainer.where.main:
        return _fit(trainer)
    session_started(trainer.run_dir)
    try:
        results = _fit(trainer)
    except KeyboardInterrupt:
        session_ended(trainer.run_dir, INTERRUPTED)
        raise
    except Exception as e:
        session_ended(trainer.run_dir, FAILED, f"{type(e).__name__}: {e}")
        raise
    session_ended(trainer.run_dir, DONE)
    return results


def run_training(cfg: RunConfig, resume: bool = False, callbacks: tuple[Callback, ...] = ()) -> dict[str, Any]:
    """Set the run up and fit it, holding its folder; results.json's content plus `run_dir` (only `run_dir` on the
    other processes of a multi-process run)."""
    with owned_run(cfg.run_dir):
        trainer = build_trainer(cfg, resume=resume)
        results = fit(trainer, callbacks)
    return {**results, "run_dir": str(trainer.run_dir)}


def _fit(trainer: Trainer) -> dict[str, Any]:
    cfg = trainer.cfg
    _describe(trainer)
    started = time.perf_counter()
    if trainer.state.step == 0 and trainer.state.batch == 0 and _evaluates(trainer):
        evaluate(trainer, baseline=True)
    for epoch in range(trainer.state.epoch, cfg.train.epochs):
        if stopped(trainer):
            break
        train_epoch(trainer, epoch)
        if stopped(trainer):
            break
        _end_epoch(trainer, epoch)
    if not trainer.where.main:
        return {}
    return finish(trainer, time.perf_counter() - started)


def _describe(trainer: Trainer) -> None:
    log.info("run directory: %s", trainer.run_dir)
    table = trainer.train_table
    if table is not None:
        log.info(
            "train: %d images, %d captions; %d steps per epoch",
            len(table.images),
            table.num_captions,
            trainer.steps_per_epoch,
        )
    else:
        log.info("train: streaming %s; %d steps per epoch", trainer.cfg.data.shards, trainer.steps_per_epoch)
    log.info("trainable parameters:\n%s", trainable_summary(trainer.model))
    if trainer.cfg.train.keep_checkpoints == 0:
        log.warning("train.keep_checkpoints is 0: no resume checkpoints are written, so this run cannot be resumed")
    if trainer.selection is not None:
        chosen = trainer.selection
        log.info("selection: model/ keeps the weights of the best %s (%s)", chosen.metric, chosen.mode)
