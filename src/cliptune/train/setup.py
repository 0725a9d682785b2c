"""Setting a run up: the run directory, the model with its fine-tuning strategy, data, optimizer, and resume."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cliptune import config as config_mod
from cliptune.config import ConfigError, RunConfig
from cliptune.data import CaptionTable, TrainPairs, collate_skip_none, read_caption_table
from cliptune.eval import EvalSuite
from cliptune.eval.encode import Encoding
from cliptune.eval.feature_store import FeatureStore
from cliptune.inference import load_any
from cliptune.models import ClipModel, build_model, rebuild
from cliptune.models.base import Tower
from cliptune.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint
from cliptune.train.logging import METRICS_FILE, TRAIN_LOG_FILE, RunLog, log, truncate_after
from cliptune.train.optim import build_optimizer, build_scheduler
from cliptune.tuning.ema import EMA
from cliptune.tuning.locking import apply_locking, fully_locked_towers
from cliptune.tuning.lora import apply_lora
from cliptune.tuning.strategies import changing_state, keep_prompts_trainable, lora_towers, save_initial_state, wrap
from cliptune.tuning.wise import INITIAL_FILE

Callback = Callable[["Trainer"], None]
# When a resumed run may differ from the saved config: these change how, not what, is computed.
_RESUMABLE_CHANGES = {
    ("train", "epochs"),
    ("runtime", "progress"),
    ("runtime", "feature_cache"),
    ("runtime", "workers"),
    ("runtime", "device"),
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
    ema: EMA | None = None
    skipped_samples: int = 0

    def __post_init__(self) -> None:
        # Counted before training ends: merging LoRA at the end removes the adapters that were trained.
        self.trainable_parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

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
    """The architecture to train: pretrained (or `model.init`) weights, wrapped with heads / prompts if asked."""
    assets = run_dir / "model_assets"
    if resuming and (assets / "model.json").is_file():
        # The checkpoint holds every weight: rebuild the architecture without fetching pretrained weights again.
        return rebuild(json.loads((assets / "model.json").read_text()), assets)
    model = load_any(cfg.model.init) if cfg.model.init else build_model(cfg.model)
    model = wrap(model, cfg.finetune)
    assets.mkdir(parents=True, exist_ok=True)
    model.save_assets(assets)
    (assets / "model.json").write_text(json.dumps(model.spec(), indent=2))
    return model


def _prepare_model(cfg: RunConfig, resuming: bool) -> tuple[ClipModel, list[Tower]]:
    """Build, lock and adapt the model; a fresh run also records its starting weights for WiSE-FT."""
    model = _build_model(cfg, cfg.run_dir, resuming)
    apply_locking(model, cfg.finetune)
    keep_prompts_trainable(model)
    lora = lora_towers(model, cfg.finetune.lora) if cfg.finetune.lora.rank else None
    if not resuming:
        save_initial_state(changing_state(model, lora.towers if lora else []), cfg.run_dir / INITIAL_FILE)
    if lora is not None:
        apply_lora(model, lora)
    return model, fully_locked_towers(model)


def build_trainer(cfg: RunConfig, resume: bool = False) -> Trainer:
    """Everything a run needs, with every input checked before the first step."""
    if cfg.data.train is None:
        raise ConfigError("data.train: no training table configured; set data.train.path")
    device = resolve_device(cfg.runtime.device)
    train_table = read_caption_table(cfg.data.train)
    suite = EvalSuite.from_config(cfg.eval)
    checkpoint = prepare_run_dir(cfg, resume)
    seed_everything(cfg.runtime.seed)
    model, locked = _prepare_model(cfg, checkpoint is not None)
    state, rest = load_checkpoint(checkpoint, model) if checkpoint else (TrainState(), {})
    model.to(device)
    ema = EMA(model, cfg.finetune.ema_decay) if cfg.finetune.ema_decay else None
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
    steps_per_epoch = len(make_loader(cfg, dataset, epoch=0))
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch * cfg.train.epochs)
    if checkpoint:
        _restore(cfg, checkpoint, state, rest, optimizer, scheduler, ema)
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
        ema,
        rest.get("skipped_samples", 0),
    )


def _restore(
    cfg: RunConfig,
    checkpoint: Path,
    state: TrainState,
    rest: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA | None,
) -> None:
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    if ema is not None:
        ema.load_state_dict(rest["ema"])
    for path in (cfg.run_dir / METRICS_FILE, cfg.run_dir / TRAIN_LOG_FILE):
        truncate_after(path, state.epoch)
    log.info("resumed from %s (epoch %d, step %d)", checkpoint, state.epoch, state.step)


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


def make_loader(cfg: RunConfig, dataset: TrainPairs, epoch: int) -> DataLoader:
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
