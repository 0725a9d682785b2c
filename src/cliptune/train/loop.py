"""The fine-tuning loop: set up a run directory, train epoch by epoch, evaluate, checkpoint, resume."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from cliptune import config as config_mod
from cliptune.config import ConfigError, RunConfig
from cliptune.data import CaptionTable, TrainPairs, collate_skip_none, read_caption_table
from cliptune.eval import EvalSuite
from cliptune.eval.encode import Encoding, autocast
from cliptune.eval.feature_store import FeatureStore
from cliptune.losses import LOSSES, MAX_LOGIT_SCALE
from cliptune.models import ClipModel, build_model, rebuild, save_model
from cliptune.models.base import Tower
from cliptune.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from cliptune.train.logging import METRICS_FILE, TRAIN_LOG_FILE, RunLog, log, truncate_after
from cliptune.train.optim import build_optimizer, build_scheduler
from cliptune.train.report import write_results
from cliptune.tuning.locking import apply_locking, set_train_mode, trainable_summary

Callback = Callable[["Trainer"], None]
# When a resumed run may differ from the saved config: these change how, not what, is computed.
_RESUMABLE_CHANGES = {
    ("train", "epochs"),
    ("runtime", "progress"),
    ("runtime", "feature_cache"),
    ("runtime", "workers"),
    ("runtime", "device"),
    ("runtime", "feature_cache"),
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: {name!r} asked for, but no CUDA device is visible; use cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Trainer:
    cfg: RunConfig
    run_dir: Path
    model: ClipModel
    locked: list[Tower]
    device: torch.device
    train_table: CaptionTable
    dataset: TrainPairs
    encoding: Encoding
    suite: EvalSuite
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    state: TrainState
    log: RunLog
    skipped_samples: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs


# ---------------------------------------------------------------------------------------------------------------
# Setting up


def _check_resume_config(cfg: RunConfig, run_dir: Path) -> None:
    saved = config_mod.to_dict(config_mod.load(run_dir / "config.yaml"))
    now = config_mod.to_dict(cfg)
    for section, values in now.items():
        if not isinstance(values, dict):
            if saved.get(section) != values:
                raise ConfigError(f"--resume: {section} is {values!r} but the run was started with {saved[section]!r}")
            continue
        for key, value in values.items():
            if (section, key) not in _RESUMABLE_CHANGES and saved[section].get(key) != value:
                raise ConfigError(
                    f"--resume: {section}.{key} is {value!r} but {run_dir} was started with "
                    f"{saved[section].get(key)!r}; resume with the run's own config.yaml, or start a new `name`"
                )


def prepare_run_dir(cfg: RunConfig, resume: bool) -> Path | None:
    """Create the run directory; return the checkpoint to resume from, if any."""
    run_dir = cfg.run_dir
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if run_dir.is_dir() else None
    if checkpoint is not None and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints: pass --resume to continue it, or set another `name`"
        )
    if resume and checkpoint is not None:
        _check_resume_config(cfg, run_dir)
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (METRICS_FILE, TRAIN_LOG_FILE):
        if checkpoint is None and (run_dir / stale).exists():
            (run_dir / stale).unlink()
    config_mod.dump(cfg, run_dir / "config.yaml")
    return checkpoint


def _build_model(cfg: RunConfig, run_dir: Path, resuming: bool) -> ClipModel:
    assets = run_dir / "model_assets"
    if resuming and (assets / "model.json").is_file():
        # The checkpoint holds every weight: rebuild the architecture without fetching pretrained weights again.
        return rebuild(json.loads((assets / "model.json").read_text()), assets)
    model = build_model(cfg.model)
    assets.mkdir(parents=True, exist_ok=True)
    model.save_assets(assets)
    (assets / "model.json").write_text(json.dumps(model.spec(), indent=2))
    return model


def build_trainer(cfg: RunConfig, resume: bool = False) -> Trainer:
    """Everything a run needs, with every input checked before the first step."""
    if cfg.data.train is None:
        raise ConfigError("data.train: no training table configured; set data.train.path")
    device = resolve_device(cfg.runtime.device)
    train_table = read_caption_table(cfg.data.train)
    suite = EvalSuite.from_config(cfg.eval)
    checkpoint = prepare_run_dir(cfg, resume)
    seed_everything(cfg.runtime.seed)
    model = _build_model(cfg, cfg.run_dir, checkpoint is not None)
    locked = apply_locking(model, cfg.finetune)
    state, rest = load_checkpoint(checkpoint, model) if checkpoint else (TrainState(), {})
    model.to(device)
    encoding = Encoding(
        model,
        cfg.runtime.precision,
        cfg.eval.batch_size,
        cfg.runtime.workers,
        cached=locked if cfg.train.cache_locked else (),
        progress=cfg.runtime.progress,
        store=FeatureStore(cfg.runtime.feature_cache) if cfg.runtime.feature_cache else None,
    )
    dataset = _dataset(cfg, train_table, model, encoding)
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = len(_loader(cfg, dataset, epoch=0))
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch * cfg.train.epochs)
    if checkpoint:
        optimizer.load_state_dict(rest["optimizer"])
        scheduler.load_state_dict(rest["scheduler"])
        for path in (cfg.run_dir / METRICS_FILE, cfg.run_dir / TRAIN_LOG_FILE):
            truncate_after(path, state.epoch)
        log.info("resumed from %s (epoch %d, step %d)", checkpoint, state.epoch, state.step)
    return Trainer(
        cfg,
        cfg.run_dir,
        model,
        locked,
        device,
        train_table,
        dataset,
        encoding,
        suite,
        optimizer,
        scheduler,
        steps_per_epoch,
        state,
        RunLog(cfg.run_dir),
        rest.get("skipped_samples", 0),
    )


def _dataset(cfg: RunConfig, table: CaptionTable, model: ClipModel, encoding: Encoding) -> TrainPairs:
    """Training pairs; a cached locked tower contributes its precomputed outputs instead of raw inputs."""
    started = time.perf_counter()
    image_features = encoding.trunk_features("image", table.images) if "image" in encoding.cached else None
    text_features = encoding.trunk_features("text", table.flat()[0]) if "text" in encoding.cached else None
    if encoding.cached:
        log.info(
            "cached locked %s tower output(s) for training in %.1fs",
            " and ".join(encoding.cached),
            time.perf_counter() - started,
        )
    return TrainPairs(table, model.train_transform, model.tokenize, cfg.runtime.seed, image_features, text_features)


def _loader(cfg: RunConfig, dataset: TrainPairs, epoch: int) -> DataLoader:
    dataset.set_epoch(epoch)
    # The data order is a pure function of (seed, epoch), so a resumed run replays it without saved sampler state.
    generator = torch.Generator().manual_seed(cfg.runtime.seed * 100_003 + epoch)
    batch = cfg.train.batch_size
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        generator=generator,
        drop_last=len(dataset) > batch,  # a ragged last batch is a different (easier) contrastive task
        num_workers=cfg.runtime.workers,
        collate_fn=collate_skip_none,
    )


# ---------------------------------------------------------------------------------------------------------------
# Training


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


def train_step(trainer: Trainer, images: torch.Tensor, tokens: torch.Tensor) -> float:
    cfg, model = trainer.cfg, trainer.model
    with autocast(trainer.device, cfg.runtime.precision):
        image_features, text_features = _features(trainer, images, tokens)
    loss = LOSSES[cfg.loss.name](image_features, text_features, model.logit_scale.float())
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {trainer.state.step}: lower optim.lr or enable optim.grad_clip"
        )
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    trainer.optimizer.step()
    trainer.scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    trainer.state.step += 1
    return loss.item()


def _batches(trainer: Trainer, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = _loader(trainer.cfg, trainer.dataset, epoch)
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


def evaluate(trainer: Trainer) -> dict[str, dict[str, float]]:
    results = trainer.suite.run(trainer.encoding)
    trainer.log.evaluation(trainer.state.epoch, trainer.state.step, results)
    for name, values in results.items():
        shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
        log.info("eval %s (epoch %d): %s", name, trainer.state.epoch, shown)
    return results


def fit(trainer: Trainer, callbacks: tuple[Callback, ...] = ()) -> dict[str, Any]:
    """Baseline evaluation, then epochs of training, each followed by evaluation and an atomic checkpoint."""
    cfg = trainer.cfg
    log.info("run directory: %s", trainer.run_dir)
    log.info(
        "train: %d images, %d captions; %d steps per epoch",
        len(trainer.train_table.images),
        trainer.train_table.num_captions,
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
        extra = {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "skipped_samples": trainer.skipped_samples,
        }
        save_checkpoint(
            trainer.run_dir / "checkpoints", trainer.model, extra, trainer.state, cfg.train.keep_checkpoints
        )
        for callback in callbacks:
            callback(trainer)
    save_model(trainer.model, trainer.run_dir / "model")
    trainer.log.close()
    return write_results(trainer.run_dir, _run_facts(trainer, time.perf_counter() - started))


def _run_facts(trainer: Trainer, seconds: float) -> dict[str, Any]:
    table = trainer.train_table
    return {
        "run": {
            "steps": trainer.state.step,
            "epochs": trainer.state.epoch,
            "train_images": len(table.images),
            "train_captions": table.num_captions,
            "skipped_images": len(table.skipped),
            "skipped_samples": trainer.skipped_samples,
            "seconds_this_session": round(seconds, 1),
            "device": str(trainer.device),
            "precision": trainer.cfg.runtime.precision,
        }
    }
