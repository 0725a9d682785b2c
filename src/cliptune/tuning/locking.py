"""Locking whole towers: a locked tower gets no gradients and stays in eval mode (frozen BatchNorm, no dropout)."""

from __future__ import annotations

from cliptune.config import FinetuneConfig
from cliptune.models.base import ClipModel, Tower


def apply_locking(model: ClipModel, cfg: FinetuneConfig) -> list[Tower]:
    """Freeze the towers the config locks; return them so the trainer keeps them in eval mode."""
    locked: list[Tower] = [t for t, on in (("image", cfg.lock_image), ("text", cfg.lock_text)) if on]
    for name, param in model.named_parameters():
        if model.tower_of(name) in locked:
            param.requires_grad_(False)
    return locked


def set_train_mode(model: ClipModel, locked: list[Tower]) -> None:
    """model.train(), except that locked towers stay in eval mode so their BatchNorm statistics never move."""
    model.train()
    for tower in locked:
        for module in model.tower_modules(tower):
            module.eval()


def trainable_summary(model: ClipModel) -> str:
    """Trainable parameters per tower, as count and share, for the run log."""
    lines = []
    for tower in ("image", "text", "shared"):
        params = list(model.tower_parameters(tower).values())
        total = sum(p.numel() for p in params)
        if total:
            lines.append(_line(tower, sum(p.numel() for p in params if p.requires_grad), total))
    everything = list(model.parameters())
    lines.append(
        _line("all", sum(p.numel() for p in everything if p.requires_grad), sum(p.numel() for p in everything))
    )
    return "\n".join(lines)


def _line(tower: str, trainable: int, total: int) -> str:
    return f"  {tower:<6} trainable {trainable:>12,} / {total:>12,} ({100.0 * trainable / total:5.1f}%)"
