"""The fine-tuning loop: train epoch by epoch, evaluate (with EMA weights), checkpoint, and finish the run."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from tqdm import tqdm

from cliptune.losses import MAX_LOGIT_SCALE
from cliptune.losses.objective import Dense
from cliptune.models.base import ENCODERS
from cliptune.train.checkpoint import checkpoint_folder, latest_checkpoint, save_checkpoint
from cliptune.train.data import make_loader
from cliptune.train.distributed import barrier
from cliptune.train.finish import finish
from cliptune.train.forward import Batch
from cliptune.train.gradcache import chunked_backward
from cliptune.train.logging import log
from cliptune.train.setup import Callback, Trainer
from cliptune.tuning.locking import set_train_mode, trainable_summary
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


def _batches(trainer: Trainer, epoch: int) -> Iterator[Batch]:
    loader = make_loader(trainer.cfg, trainer.dataset, epoch, trainer.where)
    fields = getattr(trainer.dataset, "fields", ("image", "tokens"))
    # Every local batch is full (drop_last, or one batch holding the whole set), so a short one lost unreadable
    # images; counting here rather than in the dataset also works when worker processes do the loading.
    expected = loader.batch_size or loader.batch_sampler.local_size
    # A stream stops at the step count every rank reaches (shards split unevenly); a table's loader is that long.
    for batch in itertools.islice(loader, trainer.steps_per_epoch):
        got = 0 if batch is None else len(batch[0])
        trainer.skipped_samples += expected - got
        if got < 2 and not trainer.where.distributed:  # a contrastive step needs at least one negative
            continue
        if batch is None:  # one process cannot skip a step the others take: their collectives would wait forever
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


def train_epoch(trainer: Trainer, epoch: int) -> None:
    cfg = trainer.cfg
    set_train_mode(trainer.model, trainer.locked)
    bar = tqdm(
        total=trainer.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        disable=not cfg.runtime.progress or not trainer.where.main,
        dynamic_ncols=True,
        leave=True,
    )
    started, seen = time.perf_counter(), 0
    for batch in _batches(trainer, epoch):
        loss = train_step(trainer, batch)
        seen += len(batch) * trainer.where.size
        rate = seen / max(time.perf_counter() - started, 1e-9)
        lr = trainer.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", refresh=False)
        bar.update()
        if trainer.state.step % cfg.runtime.log_every == 0 or trainer.state.step == trainer.total_steps:
            trainer.log.train_step(
                {
                    "step": trainer.state.step,
                    "epoch": epoch + 1,
                    "loss": loss,
                    "lr": lr,
                    "logit_scale": math.exp(trainer.model.logit_scale.item()),
                    "samples_per_s": rate,
                }
            )
    bar.close()


def evaluated_weights(trainer: Trainer) -> contextlib.AbstractContextManager:
    """The weights evaluation and export use: the EMA average when there is one, else the raw weights."""
    return trainer.ema.applied(trainer.model) if trainer.ema is not None else nullcontext()


def evaluate(trainer: Trainer) -> dict[str, dict[str, float]]:
    """Every eval set, on the main process (the others wait for it)."""
    if not trainer.where.main:
        barrier(trainer.where)
        return {}
    try:
        return _evaluate(trainer)
    finally:
        barrier(trainer.where)


def _evaluate(trainer: Trainer) -> dict[str, dict[str, float]]:
    with evaluated_weights(trainer):
        results = trainer.suite.run(trainer.encoding)
    trainer.log.evaluation(trainer.state.epoch, trainer.state.step, results)
    for name, values in results.items():
        shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
        log.info("eval %s (epoch %d): %s", name, trainer.state.epoch, shown)
    return results


def _checkpoint(trainer: Trainer) -> None:
    if not trainer.where.main:
        barrier(trainer.where)
        return
    try:
        save_checkpoint(trainer)
    finally:
        barrier(trainer.where)


def fit(trainer: Trainer, callbacks: tuple[Callback, ...] = ()) -> dict[str, Any]:
    """Baseline evaluation, then epochs of training, each followed by evaluation and an atomic checkpoint."""
    cfg = trainer.cfg
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
    started = time.perf_counter()
    if trainer.state.epoch == 0 and trainer.suite:
        evaluate(trainer)
    for epoch in range(trainer.state.epoch, cfg.train.epochs):
        train_epoch(trainer, epoch)
        trainer.state.epoch = epoch + 1
        if trainer.suite:
            evaluate(trainer)
        _checkpoint(trainer)
        for callback in callbacks:
            callback(trainer)
    if not trainer.where.main:
        return {}
    return finish(trainer, time.perf_counter() - started)
