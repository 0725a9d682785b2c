"""Layer groups of a tower for layer-wise lr decay: the layout type, and recognisers for the tower libraries.

A tower with L blocks has L + 2 layer ids: 0 is the stem (patch / conv stem, class and position embeddings,
pre-norm; token and position embeddings for text), k + 1 is block k, and L + 1 is everything after the last block
(final norm, projection, heads, pooler). `ClipModel.layer_groups(tower)` answers with a `LayerGroups`; its default
walks the model's modules and asks `ClipModel.recognise_layers` of each (pre-order: outer modules first), so a
backend only says which library modules it knows (`recognise_layers`), as timm's models do with `group_matcher`.

Rules match parameter names *relative to the trunk module*: whatever wraps it (`model.`, `model.visual.`,
`image_tower.`, `text_tower.model.`, `base.`) is left out before matching, so the stem cannot be missed the way
ITRA misses it (it matches wrapped names and never decays the stem). Parameters added later (LoRA adapters, prompt
vectors) follow the same rules: inside a block they get that block's id; anywhere else in the tower (the trunk
root, a projection outside it) they count as after the last block.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from cliptune.models.base import ClipModel, Tower

log = logging.getLogger(__name__)

Assign = Callable[[str], int]  # trunk-relative parameter name -> layer id in [0, L + 1]


@dataclass(frozen=True)
class Found:
    """A recognised trunk module: what `ClipModel.recognise_layers` returns for a module it knows."""

    kind: str  # the architecture, for logs
    num_layers: int  # L
    assign: Assign
    whole: bool = True  # every parameter of the module must belong to the tower (False: some may be elsewhere)


@dataclass(frozen=True)
class LayerGroups:
    """How the parameters of one tower map to layer ids."""

    kind: str  # the architecture, for logs; "unclassified" when nothing was recognised
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


def single(kind: str) -> LayerGroups:
    """One id for the whole tower (lr scale 1)."""
    return LayerGroups(kind, "", -1, lambda _: 0)


UNCLASSIFIED = single("unclassified")


def find_trunk(model: ClipModel, tower: Tower) -> LayerGroups:
    """The outermost module of the tower that `model.recognise_layers` knows (pre-order: outer modules first)."""
    for qualified, module in model.named_modules():
        try:
            found = model.recognise_layers(module, tower)
        except Exception as e:  # a library hook that fails must not stop training: this module stays unknown
            log.debug("layer-wise lr decay: %s (%s) not classified: %r", qualified, type(module).__name__, e)
            found = None
        if found is None:
            continue
        prefix = f"{qualified}." if qualified else ""
        owners = {model.tower_of(prefix + n) for n, _ in module.named_parameters()}
        if (found.whole and owners == {tower}) or (not found.whole and tower in owners):
            return LayerGroups(found.kind, prefix, found.num_layers, found.assign)
    return UNCLASSIFIED


def is_from(module: nn.Module, package: str, *names: str) -> bool:
    """Whether the module is (a subclass of) a class from `package` called one of `names` (any name if none).

    Classes are compared by module and name, so no library is imported just to ask; the MRO is searched because
    torch's parametrize (LoRA weight adapters) swaps a module's class for a subclass of the original.
    """
    return any(
        c.__module__.split(".")[0] == package and (not names or c.__name__ in names) for c in type(module).__mro__
    )


def rule(blocks: str, stem: Iterable[str], num_layers: int, offset: int = 1) -> Assign:
    """Block k (the number `blocks` captures, plus `offset`) -> k + offset; stem names -> 0; the rest -> L + 1."""
    pattern, stem = re.compile(blocks), frozenset(stem)

    def assign(rel: str) -> int:
        match = pattern.match(rel)
        if match:
            return int(match.group(1)) + offset
        return 0 if rel.split(".", 1)[0] in stem else num_layers + 1

    return assign


# ---------------------------------------------------------------------------------------------------------------
# Libraries more than one backend uses: timm (open_clip's timm towers, composed) and Hugging Face encoders


def library_layers(module: nn.Module) -> Found | None:
    """A timm model (its own `group_matcher`) or a Hugging Face-style encoder; None for anything else."""
    if callable(getattr(module, "group_matcher", None)) and is_from(module, "timm"):
        return timm_layers(module)
    return hf_encoder_layers(module)


_HF_STEM = ("embeddings", "embedder", "pre_layrnorm")
# Where Hugging Face encoders keep their blocks: BERT/RoBERTa/ViT, CLIP/SigLIP/Swin, ConvNeXt/ResNet, DistilBERT.
_HF_BLOCKS = (("encoder", "layer"), ("encoder", "layers"), ("encoder", "stages"), ("transformer", "layer"))


def hf_encoder_layers(module: nn.Module) -> Found | None:
    """A Hugging Face-style encoder: `embeddings` (or `embedder`) then a list of blocks inside `encoder`."""
    if not any(isinstance(getattr(module, s, None), nn.Module) for s in ("embeddings", "embedder")):
        return None
    for parent, attr in _HF_BLOCKS:
        blocks = getattr(getattr(module, parent, None), attr, None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            n = len(blocks)
            return Found(f"hf-{type(module).__name__}", n, rule(rf"{parent}\.{attr}\.(\d+)\.", _HF_STEM, n))
    return None


_UNMATCHED = "\x00unmatched"  # no group_matcher pattern matches this: timm sorts it into its last (head) group


def timm_layers(trunk: nn.Module) -> Found | None:
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

    return Found(f"timm-{type(trunk).__name__}", num_layers, assign)
