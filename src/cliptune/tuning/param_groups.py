"""Layer-wise learning-rate decay: optimizer parameter groups per (tower, layer, decay / no-decay).

A tower with L blocks has L + 2 layer ids: 0 is the stem (patch / conv stem, class and position embeddings,
pre-norm; token and position embeddings for text), k + 1 is block k, and L + 1 is everything after the last block
(final norm, projection, heads, pooler). A parameter with id i gets lr scale ld ** (L + 1 - i): the stem
ld ** (L + 1), block k ld ** (L - k), the top 1.0. `logit_scale` / `logit_bias` and the composed backend's new heads
are the "shared" tower: one id, scale 1.

Which layer a parameter is in, the model answers itself (`ClipModel.layer_groups`, built on the recognisers of
`cliptune.models.layers`); this module turns those answers into AdamW groups. Parameters the objective owns
(SigLIP's bias when the model has none) join the "shared" groups like the model's own.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

from torch import nn

from cliptune.config import OptimConfig
from cliptune.models.base import ENCODERS, TORCH_WRAPPERS, TOWERS, ClipModel, Tower, strip_components
from cliptune.models.layers import LayerGroups, single

log = logging.getLogger(__name__)

SHARED = single("shared")


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter is exempt from weight decay: 1-D (gains, biases), the temperature, SigLIP's bias, prompts."""
    # Decaying gains, biases, embeddings of 1-D shape or the temperature pulls them towards 0, which hurts CLIP.
    # Learned prompt vectors are word embeddings in all but name: they are not decayed either.
    exempt = ("logit_scale" in name, "logit_bias" in name, name.endswith((".bias", "prompt")))
    return param.ndim < 2 or any(exempt)


# ---------------------------------------------------------------------------------------------------------------
# Public API


def layer_id(model: ClipModel, name: str) -> tuple[Tower, int, int]:
    """(tower, layer id, number of ids in that tower = L + 2) of a parameter; lr scale = ld ** (ids - 1 - id).

    An architecture that is not recognised gets one id for the whole tower (scale 1) and a warning, once.
    """
    name = strip_components(name, TORCH_WRAPPERS)
    tower = model.tower_of(name)
    layout = _layouts(model)[tower]
    if layout.kind == "unclassified":
        _warn_unclassified(model, tower)
    return tower, layout.layer_of(name), layout.num_ids


def param_groups(
    model: ClipModel, cfg: OptimConfig, extra: dict[str, nn.Parameter] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: one per (tower, layer id, decay / no-decay).

    Each group has `params`, `lr` (absolute peak lr: the tower's lr times the layer's scale), `weight_decay` (the
    tower's, 0 for biases, norms, 1-D parameters and the temperature: `no_decay`) and, for logging,
    `lr_scale`, `tower`, `layer_id`, `num_ids` and `names`. Groups are ordered by tower, layer id, decay first.
    `extra` (name -> parameter: the objective's own) are shared parameters outside the model.
    """
    layouts = _layouts(model)
    decay = {"image": cfg.layer_decay_image, "text": cfg.layer_decay_text, "shared": 1.0}
    lrs = {"image": _pick(cfg.lr_image, cfg.lr), "text": _pick(cfg.lr_text, cfg.lr), "shared": cfg.lr}
    wds = {
        "image": _pick(cfg.weight_decay_image, cfg.weight_decay),
        "text": _pick(cfg.weight_decay_text, cfg.weight_decay),
        "shared": cfg.weight_decay,
    }
    groups: dict[tuple[int, int, bool], dict[str, Any]] = {}
    for name, param, tower in _trainable(model, extra or {}):
        layout = layouts[tower]
        if layout.kind == "unclassified" and decay[tower] != 1.0:
            _warn_unclassified(model, tower)
        lid = layout.layer_of(name)
        exempt = no_decay(name, param)
        key = (TOWERS.index(tower), lid, exempt)
        if key not in groups:
            scale = float(decay[tower] ** (layout.num_ids - 1 - lid))
            groups[key] = {
                "params": [],
                "lr": lrs[tower] * scale,
                "weight_decay": 0.0 if exempt else wds[tower],
                "lr_scale": scale,
                "tower": tower,
                "layer_id": lid,
                "num_ids": layout.num_ids,
                "names": [],
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _trainable(model: ClipModel, extra: dict[str, nn.Parameter]) -> Iterable[tuple[str, nn.Parameter, Tower]]:
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield name, param, model.tower_of(name)
    for name, param in extra.items():
        if param.requires_grad:
            yield name, param, "shared"


def describe_groups(groups: Iterable[dict[str, Any]]) -> str:
    """A table of parameter groups for the run log: tower, layer, lr scale, lr, weight decay, tensors, parameters."""
    header = (
        f"  {'tower':<6} {'layer':>7} {'lr scale':>9} {'lr':>10} {'weight decay':>12} {'tensors':>8} {'params':>13}"
    )
    lines = [header]
    tensors = params = 0
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        tensors, params = tensors + len(g["params"]), params + n
        layer = f"{g.get('layer_id', 0)}/{g.get('num_ids', 1) - 1}"
        lines.append(
            f"  {g.get('tower', '-'):<6} {layer:>7} {g.get('lr_scale', 1.0):>9.4g} {g['lr']:>10.3g} "
            f"{g['weight_decay']:>12.3g} {len(g['params']):>8} {n:>13,}"
        )
    lines.append(f"  {'all':<6} {'':>7} {'':>9} {'':>10} {'':>12} {tensors:>8} {params:>13,}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Each tower's layer groups, as the model reports them (`ClipModel.layer_groups`)


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], dict[Tower, LayerGroups]]] = (
    weakref.WeakKeyDictionary()
)
_WARNED: set[tuple[str, ...]] = set()


def _layouts(model: ClipModel) -> dict[Tower, LayerGroups]:
    """The layout of every tower, cached per model until its parameter names change (LoRA, new heads)."""
    names = tuple(n for n, _ in model.named_parameters())
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == names:
        return cached[1]
    layouts: dict[Tower, LayerGroups] = {tower: model.layer_groups(tower) for tower in ENCODERS}
    layouts["shared"] = SHARED
    _CACHE[model] = (names, layouts)
    return layouts


def _warn_unclassified(model: ClipModel, tower: Tower) -> None:
    trunks = tuple(type(m).__name__ for m in model.tower_modules(tower))
    key = (type(model).__name__, getattr(model, "arch", ""), tower, *trunks)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(
            "layer-wise lr decay: the %s tower (%s) is an architecture cliptune does not know; "
            "its parameters share one layer id (lr scale 1.0)",
            tower,
            ", ".join(trunks) or type(model).__name__,
        )
