"""The fine-tuning loop: train epoch by epoch, evaluate (with EMA weights), checkpoint, and finish the run."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cliptune.eval.encode import autocast
from cliptune.losses import LOSSES, MAX_LOGIT_SCALE
from cliptune.models.base import Tower
from cliptune.train.checkpoint import save_checkpoint
from cliptune.train.finish import finish
from cliptune.train.gradcache import chunked_backward
from cliptune.train.logging import log
from cliptune.train.setup import Callback, Trainer, make_loader
from cliptune.tuning.locking import set_train_mode, trainable_summary


def _embed(trainer: Trainer, tower: Tower, inputs: torch.Tensor) -> torch.Tensor:
    model = trainer.model
    if tower in trainer.encoding.cached:  # inputs are the locked trunk's outputs: only the head runs
        return F.normalize(getattr(model, f"{tower}_head")(inputs).float(), dim=-1)
    encode = model.encode_image if tower == "image" else model.encode_text
    # A locked tower needs no graph: running it under no_grad saves its activations' memory.
    with torch.no_grad() if tower in trainer.locked else nullcontext():
        return encode(inputs).float()


def _features(trainer: Trainer, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _embed(trainer, "image", images), _embed(trainer, "text", tokens)


def _backward(trainer: Trainer, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Loss and gradients of one contrastive batch, in chunks (GradCache) when it exceeds train.chunk_size."""
    cfg, model = trainer.cfg, trainer.model
    loss_fn = LOSSES[cfg.loss.name]
    chunk = cfg.train.chunk_size
    if chunk is not None and chunk < len(images):
        return chunked_backward(
            model,
            images,
            tokens,
            loss_fn,
            chunk,
            encode_image=lambda x: _embed(trainer, "image", x),
            encode_text=lambda x: _embed(trainer, "text", x),
            forward_context=lambda: autocast(trainer.device, cfg.runtime.precision),
            towers=[t for t in ("image", "text") if t not in trainer.locked],
        )
    with autocast(trainer.device, cfg.runtime.precision):
        image_features, text_features = _features(trainer, images, tokens)
    loss = loss_fn(image_features, text_features, model.logit_scale.float())
    if torch.isfinite(loss):
        loss.backward()
    return loss.detach()


def train_step(trainer: Trainer, images: torch.Tensor, tokens: torch.Tensor) -> float:
    cfg, model = trainer.cfg, trainer.model
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = _backward(trainer, images, tokens)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {trainer.state.step}: lower optim.lr or enable optim.grad_clip"
        )
    if cfg.optim.grad_clip is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    trainer.optimizer.step()
    trainer.scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    if trainer.ema is not None:
        trainer.ema.update(model)
    trainer.state.step += 1
    return loss.item()


def _batches(trainer: Trainer, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader(trainer.cfg, trainer.dataset, epoch)
    # Every batch is full (drop_last, or one batch holding the whole set), so a short one lost unreadable images;
    # counting here rather than in the dataset also works when worker processes do the loading.
    expected = min(trainer.cfg.train.batch_size, len(loader.dataset))
    for batch in loader:
        got = 0 if batch is None else len(batch[0])
        trainer.skipped_samples += expected - got
        if got < 2:  # a contrastive step needs at least one negative
            continue
        yield batch[0].to(trainer.device, non_blocking=True), batch[1].to(trainer.device, non_blocking=True)


def train_epoch(trainer: Trainer, epoch: int) -> None:
    cfg = trainer.cfg
    set_train_mode(trainer.model, trainer.locked)
    bar = tqdm(
        total=trainer.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        disable=not cfg.runtime.progress,
        dynamic_ncols=True,
        leave=True,
    )
    started, seen = time.perf_counter(), 0
    for images, tokens in _batches(trainer, epoch):
        loss = train_step(trainer, images, tokens)
        seen += len(images)
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
    with evaluated_weights(trainer):
        results = trainer.suite.run(trainer.encoding)
    trainer.log.evaluation(trainer.state.epoch, trainer.state.step, results)
    for name, values in results.items():
        shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
        log.info("eval %s (epoch %d): %s", name, trainer.state.epoch, shown)
    return results


def _checkpoint(trainer: Trainer) -> None:
    extra = {
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "skipped_samples": trainer.skipped_samples,
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
    }
    folder, keep = trainer.run_dir / "checkpoints", trainer.cfg.train.keep_checkpoints
    save_checkpoint(folder, trainer.model, extra, trainer.state, keep)


def fit(trainer: Trainer, callbacks: tuple[Callback, ...] = ()) -> dict[str, Any]:
    """Baseline evaluation, then epochs of training, each followed by evaluation and an atomic checkpoint."""
    cfg = trainer.cfg
    log.info("run directory: %s", trainer.run_dir)
    table = trainer.train_table
    log.info(
        "train: %d images, %d captions; %d steps per epoch",
        len(table.images),
        table.num_captions,
        trainer.steps_per_epoch,
    )
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
    return finish(trainer, time.perf_counter() - started)
