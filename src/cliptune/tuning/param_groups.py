"""Layer-wise learning-rate decay: optimizer parameter groups per (tower, layer, decay / no-decay).

A tower with L blocks has L + 2 layer ids: 0 is the stem (patch / conv stem, class and position embeddings,
pre-norm; token and position embeddings for text), k + 1 is block k, and L + 1 is everything after the last block
(final norm, projection, heads, pooler). A parameter with id i gets lr scale ld ** (L + 1 - i): the stem
ld ** (L + 1), block k ld ** (L - k), the top 1.0. `logit_scale` / `logit_bias` and the composed backend's new heads
are the "shared" tower: one id, scale 1.

Which module is a tower's trunk is found from the module types (outermost recognised module whose parameters all
belong to the tower), and the rules match parameter names *relative to that trunk*: whatever wraps it (`model.`,
`model.visual.`, `image_tower.`, `text_tower.model.`, DDP's `module.`) is stripped before matching, so the stem
cannot be missed the way ITRA misses it (it matches wrapped names and never decays the stem). Parameters added
later (LoRA adapters, prompt vectors) follow the same rules: inside a block they get that block's id; anywhere
else in the tower (the trunk root, a projection outside it) they count as after the last block.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from cliptune.config import OptimConfig
from cliptune.models.base import ClipModel, Tower
from cliptune.train.optim import _no_decay

log = logging.getLogger(__name__)

TOWERS: tuple[Tower, ...] = ("image", "text", "shared")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile

Assign = Callable[[str], int]  # trunk-relative parameter name -> layer id in [0, L + 1]


@dataclass(frozen=True)
class TowerLayout:
    """How the parameters of one tower map to layer ids."""

    kind: str  # the architecture, for logs
    prefix: str  # qualified name of the trunk module plus "." ("" when nothing was recognised)
    num_layers: int  # L; -1 for one id for the whole tower (shared parameters, unrecognised towers)
    assign: Assign

    @property
    def num_ids(self) -> int:
        return self.num_layers + 2

    def layer_of(self, name: str) -> int:
        if not name.startswith(self.prefix):
            return self.num_layers + 1  # in the tower but outside the trunk: a projection or head
        return min(max(self.assign(name[len(self.prefix) :]), 0), self.num_layers + 1)


def _single(kind: str) -> TowerLayout:
    return TowerLayout(kind, "", -1, lambda _: 0)


SHARED = _single("shared")


# ---------------------------------------------------------------------------------------------------------------
# Public API


def layer_id(model: ClipModel, name: str) -> tuple[Tower, int, int]:
    """(tower, layer id, number of ids in that tower = L + 2) of a parameter; lr scale = ld ** (ids - 1 - id).

    An architecture that is not recognised gets one id for the whole tower (scale 1) and a warning, once.
    """
    name = _strip_wrappers(model, name)
    tower = model.tower_of(name)
    layout = _layouts(model)[tower]
    if layout.kind == "unclassified":
        _warn_unclassified(model, tower)
    return tower, layout.layer_of(name), layout.num_ids


def param_groups(model: ClipModel, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: one per (tower, layer id, decay / no-decay).

    Each group has `params`, `lr` (absolute peak lr: the tower's lr times the layer's scale), `weight_decay` (the
    tower's, 0 for biases, norms, 1-D parameters and the temperature: the rule of `train.optim`) and, for logging,
    `lr_scale`, `tower`, `layer_id`, `num_ids` and `names`. Groups are ordered by tower, layer id, decay first.
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
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower = model.tower_of(name)
        layout = layouts[tower]
        if layout.kind == "unclassified" and decay[tower] != 1.0:
            _warn_unclassified(model, tower)
        lid = layout.layer_of(name)
        no_decay = _no_decay(name, param)
        key = (TOWERS.index(tower), lid, no_decay)
        if key not in groups:
            scale = float(decay[tower] ** (layout.num_ids - 1 - lid))
            groups[key] = {
                "params": [],
                "lr": lrs[tower] * scale,
                "weight_decay": 0.0 if no_decay else wds[tower],
                "lr_scale": scale,
                "tower": tower,
                "layer_id": lid,
                "num_ids": layout.num_ids,
                "names": [],
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


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
# Finding each tower's trunk


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


def _strip_wrappers(model: nn.Module, name: str) -> str:
    top = {n for n, _ in model.named_children()} | set(model._parameters)
    while name.startswith(WRAPPER_PREFIXES) and name.split(".", 1)[0] not in top:
        name = name.split(".", 1)[1]
    return name


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], dict[Tower, TowerLayout]]] = (
    weakref.WeakKeyDictionary()
)
_WARNED: set[tuple[str, ...]] = set()


def _layouts(model: ClipModel) -> dict[Tower, TowerLayout]:
    """The layout of every tower, cached per model until its parameter names change (LoRA, new heads)."""
    names = tuple(n for n, _ in model.named_parameters())
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == names:
        return cached[1]
    layouts: dict[Tower, TowerLayout] = {"image": _resolve(model, "image"), "text": _resolve(model, "text")}
    layouts["shared"] = SHARED
    _CACHE[model] = (names, layouts)
    return layouts


def _resolve(model: ClipModel, tower: Tower) -> TowerLayout:
    """The outermost recognised module of the tower (pre-order: outer modules come first)."""
    for qualified, module in model.named_modules():
        try:
            found = _recognise(module, tower)
        except Exception as e:  # a library hook that fails must not stop training: this module stays unknown
            log.debug("layer-wise lr decay: %s (%s) not classified: %r", qualified, type(module).__name__, e)
            found = None
        if found is None:
            continue
        kind, num_layers, assign, whole = found
        prefix = f"{qualified}." if qualified else ""
        owners = {model.tower_of(prefix + n) for n, _ in module.named_parameters()}
        if (whole and owners == {tower}) or (not whole and tower in owners):
            return TowerLayout(kind, prefix, num_layers, assign)
    return _single("unclassified")


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


# (kind, L, assign, whether every parameter of the module must belong to the tower)
Found = tuple[str, int, Assign, bool]


def _is(module: nn.Module, package: str, *names: str) -> bool:
    """Whether the module is (a subclass of) a class from `package` called one of `names` (any name if none).

    Classes are compared by module and name, so no library is imported just to ask; the MRO is searched because
    torch's parametrize (LoRA weight adapters) swaps a module's class for a subclass of the original.
    """
    return any(
        c.__module__.split(".")[0] == package and (not names or c.__name__ in names) for c in type(module).__mro__
    )


def _rule(blocks: str, stem: Iterable[str], num_layers: int, offset: int = 1) -> Assign:
    """Block k (the number `blocks` captures, plus `offset`) -> k + offset; stem names -> 0; the rest -> L + 1."""
    pattern, stem = re.compile(blocks), frozenset(stem)

    def assign(rel: str) -> int:
        match = pattern.match(rel)
        if match:
            return int(match.group(1)) + offset
        return 0 if rel.split(".", 1)[0] in stem else num_layers + 1

    return assign


_OPENCLIP_VIT_STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patchnorm_pre_ln")
_OPENCLIP_RESNET_STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
_OPENCLIP_TEXT_STEM = ("token_embedding", "positional_embedding", "cls_emb")
_RESBLOCKS = r"transformer\.resblocks\.(\d+)\."
_HF_STEM = ("embeddings", "embedder", "pre_layrnorm")
# Where Hugging Face encoders keep their blocks: BERT/RoBERTa/ViT, CLIP/SigLIP/Swin, ConvNeXt/ResNet, DistilBERT.
_HF_BLOCKS = (("encoder", "layer"), ("encoder", "layers"), ("encoder", "stages"), ("transformer", "layer"))


def _recognise(module: nn.Module, tower: Tower) -> Found | None:
    if _is(module, "open_clip", "VisionTransformer") and hasattr(module, "transformer"):
        n = len(module.transformer.resblocks)
        return "openclip-vit", n, _rule(_RESBLOCKS, _OPENCLIP_VIT_STEM, n), True
    if _is(module, "open_clip", "ModifiedResNet"):
        return "openclip-resnet", 4, _rule(r"layer([1-4])\.", _OPENCLIP_RESNET_STEM, 4, offset=0), True
    if _is(module, "open_clip", "TextTransformer"):
        n = len(module.transformer.resblocks)
        return "openclip-text", n, _rule(_RESBLOCKS, _OPENCLIP_TEXT_STEM, n), True
    if tower == "text" and _is(module, "open_clip", "CLIP") and hasattr(module, "token_embedding"):
        # open_clip's CLIP keeps its text transformer flat on the model, beside `visual` and `logit_scale`.
        n = len(module.transformer.resblocks)
        return "openclip-text", n, _rule(_RESBLOCKS, _OPENCLIP_TEXT_STEM, n), False
    if callable(getattr(module, "group_matcher", None)) and _is(module, "timm"):
        return _timm(module)
    if _is(module, "torchvision", "ResNet"):
        return "torchvision-resnet", 4, _rule(r"layer([1-4])\.", ("conv1", "bn1"), 4, offset=0), True
    if _is(module, "efficientnet_lite_pytorch", "EfficientNet"):
        n = len(module._blocks)
        return "efficientnet-lite", n, _rule(r"_blocks\.(\d+)\.", ("_conv_stem", "_bn0"), n), True
    return _hf_encoder(module)


def _hf_encoder(module: nn.Module) -> Found | None:
    """A Hugging Face-style encoder: `embeddings` (or `embedder`) then a list of blocks inside `encoder`."""
    if not any(isinstance(getattr(module, s, None), nn.Module) for s in ("embeddings", "embedder")):
        return None
    for parent, attr in _HF_BLOCKS:
        blocks = getattr(getattr(module, parent, None), attr, None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            n = len(blocks)
            return f"hf-{type(module).__name__}", n, _rule(rf"{parent}\.{attr}\.(\d+)\.", _HF_STEM, n), True
    return None


_UNMATCHED = "\x00unmatched"  # no group_matcher pattern matches this: timm sorts it into its last (head) group


def _timm(trunk: nn.Module) -> Found | None:
    """timm's own fine-grained grouping (`group_matcher(coarse=False)`): group 0 is the stem, then the blocks.

    Parameters no pattern matches (necks, heads) form timm's last group: after the last block. Parameters that
    timm folds into the last block's group (MATCH_PREV_GROUP: ViT's final `norm`, EfficientNet's `conv_head`)
    come after the last block too, as in the other backends.
    """
    try:
        from timm.models._manipulate import MATCH_PREV_GROUP, group_with_matcher
    except ImportError:  # a timm without these helpers: the tower is left unclassified
        return None
    matcher = trunk.group_matcher(coarse=False)

    def timm_ids(names: list[str]) -> dict[str, int]:
        return group_with_matcher(((n, None) for n in [*names, _UNMATCHED]), matcher, reverse=True)

    known = [n for n, _ in trunk.named_parameters()]
    ids = timm_ids(known)
    num_layers = ids.pop(_UNMATCHED) - 1  # the unmatched group's id is L + 1
    if num_layers < 1:
        return None

    def trailing(rel: str) -> bool:
        # The first pattern that matches decides (as in timm): does it join the previous group?
        if not isinstance(matcher, dict):
            return False
        for spec in matcher.values():
            entries = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
            for regex, suffix in entries if spec is not None else ():
                if re.match(regex, rel):
                    return tuple(suffix or ()) == MATCH_PREV_GROUP
        return False

    def assign(rel: str) -> int:
        tid = ids[rel] if rel in ids else timm_ids([*known, rel]).get(rel, num_layers + 1)
        return num_layers + 1 if tid == num_layers and trailing(rel) else tid

    return f"timm-{type(trunk).__name__}", num_layers, assign, True
