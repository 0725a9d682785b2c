"""The optimizer (AdamW by default) over the CLIP weight-decay split, and the per-step warm-up + cosine schedule."""

from __future__ import annotations

import logging
import math

import timm.optim
import torch
from torch import nn

from cliptune.config import OptimConfig
from cliptune.models.base import ClipModel
from cliptune.tuning.param_groups import describe_groups, param_groups


def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    # torch's SGD adds weight decay to the gradient (L2), as the linear-probe and timm "momentum" recipes do.
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _lamb(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    # timm's LAMB (torch has none) with timm's own defaults otherwise, as `timm.optim.create_optimizer_v2("lamb")`
    # builds it: weight decay inside the trust ratio (the paper's) and its global gradient-norm clip at 1.0.
    return timm.optim.Lamb(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _lion(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    # timm's Lion (torch has none): sign of the interpolated momentum, decoupled weight decay; no eps.
    return timm.optim.Lion(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# optim.optimizer -> its factory over parameter groups (each group carries its own lr scale and weight decay).
OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd, "lamb": _lamb, "lion": _lion}


def build_optimizer(
    model: ClipModel, cfg: OptimConfig, extra: dict[str, nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """`optim.optimizer` over per-tower, per-layer groups (layer-wise lr decay, per-tower lr and weight decay);
    `extra` parameters (the objective's own) join the shared groups."""
    groups = param_groups(model, cfg, extra)
    if not groups:
        raise ValueError("nothing to train: every parameter is locked (see the `finetune` section of the config)")
    logging.getLogger("cliptune").info("parameter groups:\n%s", describe_groups(groups))
    return OPTIMIZERS[cfg.optimizer](groups, cfg)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up from lr/warmup, then cosine to 0 (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int | None) -> int:
    """optim.warmup_epochs in steps (rounded) when set, else optim.warmup_steps."""
    if cfg.warmup_epochs is None:
        return cfg.warmup_steps
    if steps_per_epoch is None:
        raise ValueError("optim.warmup_epochs needs the number of steps per epoch")
    return round(cfg.warmup_epochs * steps_per_epoch)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(cfg, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, cfg.schedule))
