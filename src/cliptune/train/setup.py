"""Setting a run up: the run directory, the model with its fine-tuning strategy, data, optimizer, and resume."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cliptune import config as config_mod
from cliptune.config import ConfigError, EvalConfig, RunConfig, TableSpec, ZeroShotSpec
from cliptune.data import CaptionTable, TrainPairs
from cliptune.data.shards import ShardStream
from cliptune.eval import EvalSuite
from cliptune.features import FeatureStore
from cliptune.features.encoding import Encoding
from cliptune.inference import load_any, resolve_device
from cliptune.losses.objective import OBJECTIVES, Objective
from cliptune.models import ClipModel, build_model
from cliptune.models.base import Tower
from cliptune.models.checkpoints import checkpoint_folder, latest_checkpoint
from cliptune.models.io import SPEC_FILE, rebuild_from, write_spec
from cliptune.train.checkpoint import BEST, TrainState, load_checkpoint, restore_training
from cliptune.train.data import (
    check_enough_images,
    shard_stream,
    split_validation,
    steps_per_epoch,
    train_dataset,
    training_table,
)
from cliptune.train.distributed import SINGLE, World, barrier, check_batch, init_distributed, local_device
from cliptune.train.forward import TrainModule
from cliptune.train.guard import check_progress, check_training_data, make_run_dir
from cliptune.train.logging import METRICS_FILE, TRAIN_LOG_FILE, RunLog, SilentLog, epoch_at, log, truncate_after
from cliptune.train.optim import build_optimizer, build_scheduler
from cliptune.train.selection import Selection, build_selection
from cliptune.tuning.ema import EMA
from cliptune.tuning.locking import apply_locking, fully_locked_towers
from cliptune.tuning.strategies import adapt, adapted_towers, after_locking, changing_state, save_initial_state, wrap
from cliptune.tuning.wise import INITIAL_FILE

if TYPE_CHECKING:
    from cliptune.data.augment import PairMixup

Callback = Callable[["Trainer"], None]
# When a resumed run may differ from the saved config: these change how, not what, is computed.
_RESUMABLE_CHANGES = {
    ("train", "epochs"),
    ("runtime", "progress"),
    ("runtime", "feature_cache"),
    ("runtime", "workers"),
    ("runtime", "device"),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(kw_only=True)
class Trainer:
    """What a run trains with. Everything is fixed when the run is set up except the step state: `state` (epoch,
    step and batch, saved in checkpoints), `skipped_samples` / `skipped_first`, `selection`, the epoch's loss, and
    the weights inside `model`, `optimizer`, `scheduler`, `ema`."""

    # fixed for the run
    cfg: RunConfig
    run_dir: Path
    model: ClipModel
    locked: list[Tower]
    device: torch.device
    train_table: CaptionTable | None  # None when training streams from shards
    dataset: TrainPairs | ShardStream
    encoding: Encoding
    suite: EvalSuite
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    log: RunLog | SilentLog
    module: TrainModule
    forward: Callable[..., Any]  # `module`, or its DDP wrapper, possibly compiled: what a step calls
    where: World = SINGLE
    ema: EMA | None = None
    mixup: PairMixup | None = None  # data.mixup: mixes each batch's images and labels before the forward pass
    validation: EvalSuite = field(default_factory=EvalSuite)  # selects and stops; `suite` is reported
    # the step state
    state: TrainState = field(default_factory=TrainState)
    skipped_samples: int = 0
    skipped_first: list[str] = field(default_factory=list)  # the first few skipped samples: name (reason)
    selection: Selection | None = None  # best and last evaluation, early stopping; saved in checkpoints
    epoch_loss: tuple[float, int] = (0.0, 0)  # this epoch's loss sum and step count, for its mean
    last_eval_step: int = -1
    resume_rng: dict[str, Any] | None = None  # applied where the saved run stood (loop._epoch_iterator)
    callbacks: tuple[Callback, ...] = ()  # run at epoch ends and mid-epoch evaluations (set by loop.fit)

    def __post_init__(self) -> None:
        # Counted before training ends: merging LoRA at the end removes the adapters that were trained.
        self.trainable_parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def objective(self) -> Objective:
        return self.module.objective

    @property
    def ddp(self) -> torch.nn.parallel.DistributedDataParallel | None:
        wrapped = getattr(self.forward, "_orig_mod", self.forward)  # torch.compile keeps the module it wraps there
        return wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    @property
    def logged_epoch(self) -> float:
        """The epoch the records of this step carry (`logging.epoch_at`: 1.5 = halfway through the second epoch)."""
        return epoch_at(self.state.step, self.steps_per_epoch)


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


def prepare_run_dir(cfg: RunConfig, resume: bool, where: World = SINGLE) -> Path | None:
    """Create the run directory (main process); return the checkpoint to resume from, if any."""
    if not where.main:  # the main process checks and writes; the others read what it decided
        barrier(where)
        found = latest_checkpoint(checkpoint_folder(cfg.run_dir))
        return found if resume else None
    try:
        return _prepare_run_dir(cfg, resume)
    finally:
        barrier(where)


def _prepare_run_dir(cfg: RunConfig, resume: bool) -> Path | None:
    run_dir = cfg.run_dir
    checkpoint = latest_checkpoint(checkpoint_folder(run_dir)) if run_dir.is_dir() else None
    if checkpoint is not None and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints: pass --resume to continue it, or set another `name`"
        )
    if resume and checkpoint is not None:
        _check_resume_config(cfg, run_dir)
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir)
    make_run_dir(run_dir)
    for stale in (METRICS_FILE, TRAIN_LOG_FILE):
        if checkpoint is None and (run_dir / stale).exists():
            (run_dir / stale).unlink()
    if checkpoint is None and (run_dir / "checkpoints" / BEST).is_dir():
        shutil.rmtree(run_dir / "checkpoints" / BEST)  # an earlier run's best weights must not become this run's
    config_mod.dump(cfg, run_dir / "config.yaml")
    return checkpoint


def _build_model(cfg: RunConfig, run_dir: Path, resuming: bool, where: World) -> ClipModel:
    """The architecture to train: pretrained (or `model.init`) weights, wrapped with heads / prompts if asked."""
    assets = run_dir / "model_assets"
    if resuming and (assets / SPEC_FILE).is_file():
        # The checkpoint holds every weight: rebuild the architecture without fetching pretrained weights again.
        # The saved spec has the input size; drop path, a training-only setting, is not saved and is set again.
        model = rebuild_from(assets / SPEC_FILE, assets)
        _model_options(cfg, model, resize=False)
        return model
    model = load_any(cfg.model.init) if cfg.model.init else build_model(cfg.model)
    _model_options(cfg, model, resize=True)
    model = wrap(model, cfg.finetune)
    prepare = OBJECTIVES[cfg.loss.name].prepare
    if prepare is not None:
        model = prepare(cfg, model)
    if where.main:
        assets.mkdir(parents=True, exist_ok=True)
        model.save_assets(assets)
        write_spec(model, assets)
    return model


def _model_options(cfg: RunConfig, model: ClipModel, resize: bool) -> None:
    """model.image_size and model.drop_path, through the backend's hooks; unsupported ones are config errors."""
    try:
        if resize and cfg.model.image_size is not None:
            model.set_image_size(cfg.model.image_size)
            log.info("image input size: %d px (position embeddings interpolated)", cfg.model.image_size)
        # Also at 0, which turns off a drop path the tower's library builds in (efficientnet-lite's 0.2).
        blocks = model.set_drop_path(cfg.model.drop_path)
        if blocks:
            log.info("drop path up to %.3f over %d image-tower blocks", cfg.model.drop_path, blocks)
    except NotImplementedError as e:
        raise ConfigError(str(e)) from None


def _prepare_model(cfg: RunConfig, resuming: bool, where: World) -> tuple[ClipModel, list[Tower]]:
    """Build, lock and adapt the model; a fresh run also records its starting weights for WiSE-FT."""
    model = _build_model(cfg, cfg.run_dir, resuming, where)
    apply_locking(model, cfg.finetune)
    after_locking(model, cfg.finetune)
    if not OBJECTIVES[cfg.loss.name].uses_text:  # FT-CLIP trains the image tower and the head only
        for param in model.tower_parameters("text").values():
            param.requires_grad_(False)
        # nor the image-text temperature (FT-CLIP's head has its own fixed scale): an unused trainable parameter
        # would stall DDP's gradient reduction
        model.logit_scale.requires_grad_(False)
    if not resuming and where.main:
        adapted = adapted_towers(model, cfg.finetune)
        save_initial_state(changing_state(model, adapted), cfg.run_dir / INITIAL_FILE)
    adapt(model, cfg.finetune)
    return model, fully_locked_towers(model)


def build_trainer(cfg: RunConfig, resume: bool = False) -> Trainer:
    """Everything a run needs, with every input checked before the first step."""
    config_mod.check_training(cfg)
    where, device = _process(cfg)
    train_table, labels = training_table(cfg)
    split = None
    if cfg.data.validation_split and train_table is not None:
        train_table, split = split_validation(train_table, cfg.data.validation_split, cfg.runtime.seed)
        log.info("validation: %d of the training images held back (data.validation_split)", len(split))
    check_enough_images(cfg, train_table)
    suite = EvalSuite.from_config(cfg.eval)
    validation, kinds = _validation_suite(cfg, split)
    selection = build_selection(cfg, kinds)
    checkpoint = prepare_run_dir(cfg, resume, where)
    if where.main:
        check_training_data(cfg.run_dir, train_table, checkpoint is not None)
    seed_everything(cfg.runtime.seed)
    model, locked = _prepare_model(cfg, checkpoint is not None, where)
    objective = Objective(cfg.loss, model)
    _check_objective(cfg, model, objective, locked)
    state, rest = load_checkpoint(checkpoint, model) if checkpoint else (TrainState(), {})
    model.to(device)
    if cfg.runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    objective.to(device)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ema = EMA(model, cfg.finetune.ema_decay) if cfg.finetune.ema_decay else None
    encoding = _encoding(cfg, model, _cacheable(cfg, locked, objective))
    if train_table is None:
        dataset: TrainPairs | ShardStream = shard_stream(cfg, model, objective, where)
    else:
        dataset = train_dataset(cfg, train_table, model, encoding, labels, objective)
    optimizer = build_optimizer(model, cfg.optim, dict(objective.named_parameters()))
    steps = steps_per_epoch(cfg, dataset, where)
    scheduler = build_scheduler(optimizer, cfg.optim, steps * cfg.train.epochs, steps)
    skipped = _restore(cfg, checkpoint, state, rest, optimizer, scheduler, ema, objective, where) if checkpoint else 0
    if checkpoint and selection is not None and rest.get("selection"):
        selection.load_state_dict(rest["selection"])
    module = TrainModule(model, objective, locked, encoding.cached)
    return Trainer(
        cfg=cfg,
        run_dir=cfg.run_dir,
        model=model,
        locked=locked,
        device=device,
        train_table=train_table,
        dataset=dataset,
        encoding=encoding,
        suite=suite,
        optimizer=optimizer,
        scheduler=scheduler,
        steps_per_epoch=steps,
        log=RunLog(cfg.run_dir) if where.main else SilentLog(),
        module=module,
        forward=_forward(cfg, module, device, where),
        where=where,
        ema=ema,
        mixup=_mixup(cfg, model, where),
        state=state,
        skipped_samples=skipped,
        skipped_first=list(rest.get("skipped_first", [])),
        validation=validation,
        selection=selection,
        resume_rng=rest.get("rng"),
        epoch_loss=tuple(rest.get("epoch_loss", (0.0, 0))),
        last_eval_step=state.step if checkpoint else -1,
    )


def _mixup(cfg: RunConfig, model: ClipModel, where: World) -> PairMixup | None:
    """timm's Mixup / CutMix over the class head's classes (`config.check_training` allows it where the objective
    takes soft class targets)."""
    if not cfg.data.mixup.active:
        return None
    if (cfg.train.batch_size // where.size) % 2:
        raise ConfigError(
            f"data.mixup: mixes pairs of samples, so each process's batch must be even; train.batch_size "
            f"{cfg.train.batch_size} over {where.size} process(es) is not"
        )
    from cliptune.data.augment import PairMixup  # timm's data package: imported when mixing is on

    classes = int(model.class_weights.shape[0])
    return PairMixup(cfg.data.mixup, classes, cfg.loss.label_smoothing, cfg.runtime.seed)


def _validation_suite(cfg: RunConfig, split: CaptionTable | None) -> tuple[EvalSuite, list[tuple[str, str]]]:
    """The validation sets (the training table's split first) and their (name, kind) in config order."""
    specs = cfg.eval.validation
    tables = [s for s in specs if isinstance(s, TableSpec)]
    labelled = [s for s in specs if isinstance(s, ZeroShotSpec)]
    suite = EvalSuite.from_config(EvalConfig(retrieval=tables, zeroshot=labelled, batch_size=cfg.eval.batch_size))
    kinds = [(s.name, "retrieval" if isinstance(s, TableSpec) else "zeroshot") for s in specs]
    if split is not None:
        suite.retrieval.insert(0, split)
        kinds.insert(0, (split.name, "retrieval"))
    return suite, kinds


def _process(cfg: RunConfig) -> tuple[World, torch.device]:
    """This process's place in a torchrun job (or the only process) and the device it trains on."""
    device = resolve_device(cfg.runtime.device)
    where = init_distributed(device)
    check_batch(cfg.train.batch_size, where)
    if not where.main:  # one console: the other ranks report only warnings and errors
        log.setLevel("WARNING")
    return where, local_device(device, where)


def _check_objective(cfg: RunConfig, model: ClipModel, objective: Objective, locked: list[Tower]) -> None:
    if not objective.uses_text and "image" in locked:
        raise ConfigError(
            f"loss.name {cfg.loss.name}: the objective trains the image tower only; unlock it (finetune.lock_image "
            "false)"
        )
    if cfg.data.augment is not None and "image" in _cacheable(cfg, locked, objective):
        raise ConfigError(
            "data.augment: the image tower is locked and its outputs are computed once (train.cache_locked), so no "
            "augmented image would ever reach it; set train.cache_locked false (the tower then runs every step) or "
            "remove data.augment"
        )
    if objective.needs_tokens:  # fail before training, not at the first step
        try:
            model.check_dense_tokens()
        except NotImplementedError as e:
            raise ConfigError(f"loss.name {cfg.loss.name}: {e}") from None


def _cacheable(cfg: RunConfig, locked: list[Tower], objective: Objective) -> list[Tower]:
    """Locked towers whose outputs are computed once; hard negatives and token features need a live tower."""
    if not cfg.train.cache_locked or objective.needs_tokens or cfg.data.shards is not None:
        return []  # a stream is not held in memory, so neither are per-sample outputs of it
    return [t for t in locked if not (t == "text" and objective.needs_negatives)]


def _encoding(cfg: RunConfig, model: ClipModel, cached: list[Tower]) -> Encoding:
    return Encoding(
        model,
        cfg.runtime.precision,
        cfg.eval.batch_size,
        cfg.runtime.workers,
        cached=cached,
        progress=cfg.runtime.progress,
        store=FeatureStore(cfg.runtime.feature_cache) if cfg.runtime.feature_cache else None,
    )


def _forward(cfg: RunConfig, module: TrainModule, device: torch.device, where: World) -> Callable[..., Any]:
    """What a training step calls: the module, under DDP in a multi-process run, compiled if asked."""
    forward: torch.nn.Module = module
    if where.distributed:
        # GradCache's last chunk reaches one tower only; the other tower's gradients, accumulated under no_sync, are
        # then reduced as "unused" parameters, which needs find_unused_parameters.
        forward = torch.nn.parallel.DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(cfg.train.chunk_size),
        )
    if cfg.runtime.compile:
        return torch.compile(forward)
    return forward


def _restore(
    cfg: RunConfig,
    checkpoint: Path,
    state: TrainState,
    rest: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA | None,
    objective: Objective,
    where: World,
) -> int:
    check_progress(checkpoint, state.epoch, cfg.train.epochs)
    skipped = restore_training(rest, optimizer, scheduler, ema, objective, checkpoint)
    if where.main:
        for path in (cfg.run_dir / METRICS_FILE, cfg.run_dir / TRAIN_LOG_FILE):
            truncate_after(path, state.step)
    log.info("resumed from %s (epoch %d, step %d)", checkpoint, state.epoch, state.step)
    return skipped
