"""AdamW with the CLIP weight-decay split, and the per-step warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from cliptune.config import OptimConfig
from cliptune.models.base import ClipModel
from cliptune.tuning.param_groups import describe_groups, param_groups


def build_optimizer(
    model: ClipModel, cfg: OptimConfig, extra: dict[str, nn.Parameter] | None = None
) -> torch.optim.AdamW:
    """AdamW over per-tower, per-layer groups (layer-wise lr decay, per-tower lr and weight decay); `extra`
    parameters (the objective's own) join the shared groups."""
    groups = param_groups(model, cfg, extra)
    if not groups:
        raise ValueError("nothing to train: every parameter is locked (see the `finetune` section of the config)")
    logging.getLogger("cliptune").info("parameter groups:\n%s", describe_groups(groups))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up from lr/warmup, then cosine to 0 (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule)
    )
