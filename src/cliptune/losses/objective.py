"""`loss.name` as a module: one table (`OBJECTIVES`) says what each objective computes, needs and owns.

Each entry is an `ObjectiveSpec`: its loss on a batch's pooled features, what a batch must carry (group ids,
hard negatives, token features), whether the text tower trains at all, the parameters the objective owns (SigLIP's
bias when the model has none: they join the optimizer's shared groups) and what it changes in the model before
training (FT-CLIP's class head). A new objective is one function and one entry here (or, from outside the
package, `OBJECTIVES["name"] = ObjectiveSpec(...)`).

Every loss here is the multi-process (gathered) form, which is the plain single-process loss when there is no
process group; see `cliptune.losses.gather` for the gradient convention DDP relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from cliptune.config import LossConfig
from cliptune.losses.classification import CLASSIFIER_SCALE, classification_loss, with_class_head
from cliptune.losses.fsc import global_hn_loss, local_hn_loss
from cliptune.losses.gather import LossTerms, gathered_clip_terms
from cliptune.losses.negclip import negclip_terms
from cliptune.losses.siglip import siglip_terms
from cliptune.losses.unicl import unicl_terms
from cliptune.models.base import ClipModel

if TYPE_CHECKING:
    from cliptune.config import RunConfig


@dataclass
class Extras:
    """Per-batch inputs besides the features: group ids (label-aware targets) and which negatives exist."""

    group: torch.Tensor | None = None  # [B]
    negative_mask: torch.Tensor | None = None  # [B, N]
    targets: torch.Tensor | None = None  # [B, C] soft class targets (mixup / cutmix, smoothing included)


@dataclass
class Dense:
    """Pooled and per-token features of a batch whose texts are the captions followed by their negatives."""

    image: torch.Tensor  # [B, D] normalised
    patches: torch.Tensor  # [B, P, D]
    text: torch.Tensor  # [B + B*N, D] normalised
    tokens: torch.Tensor  # [B + B*N, L, D]
    token_mask: torch.Tensor  # [B + B*N, L]


# (objective, model, image [B, D], text [B (+ B*N), D] or None when the text tower is unused, extras) -> loss
Loss = Callable[["Objective", ClipModel, torch.Tensor, "torch.Tensor | None", Extras], torch.Tensor]
TokenLoss = Callable[["Objective", ClipModel, Dense, Extras], torch.Tensor]


def _never(cfg: LossConfig) -> bool:
    return False


def _no_parameters(cfg: LossConfig, model: ClipModel) -> dict[str, nn.Parameter]:
    return {}


@dataclass(frozen=True)
class ObjectiveSpec:
    """One training objective: its loss and everything the trainer must know about it."""

    loss: Loss
    groups: bool = False  # batches carry group ids (`Extras.group`): class labels or caption groups
    negatives: bool = False  # texts are the captions then B*N hard negatives (`Extras.negative_mask`)
    labelled: bool = False  # trains on data.labelled only (its class names make the model's head)
    uses_text: bool = True  # False: the text tower is not used, so it is frozen and never run
    tokens: Callable[[LossConfig], bool] = _never  # whether this config needs dense token features
    token_loss: TokenLoss | None = None  # the loss on pooled and token features (when `tokens` says so)
    parameters: Callable[[LossConfig, ClipModel], dict[str, nn.Parameter]] = _no_parameters  # owned by the loss
    prepare: Callable[[RunConfig, ClipModel], ClipModel] | None = None  # changes the model before training
    settings: tuple[str, ...] = ()  # the `loss.*` keys it reads (besides name and local_loss); others are warned about
    mixes: bool = False  # takes soft class targets (`Extras.targets`), so data.mixup can mix its batches


class Objective(nn.Module):
    """The configured training objective (`OBJECTIVES[cfg.name]`) with the parameters it owns.

    `logged` holds what the last batch's loss function recorded besides the total (`record`): its separate terms
    as `loss/NAME` (the image->text and text->image directions of CLIP, NegCLIP and UniCL, SigLIP's matching and
    non-matching pairs, FSC-CLIP's negclip term and its two directions, global and local hard-negative losses,
    unweighted) and values such as
    SigLIP's `logit_bias`; the training log writes them beside the loss. Recording never changes the loss.
    """

    def __init__(self, cfg: LossConfig, model: ClipModel) -> None:
        super().__init__()
        self.cfg, self.name = cfg, cfg.name
        self.spec = OBJECTIVES[cfg.name]
        for name, param in self.spec.parameters(cfg, model).items():
            self.register_parameter(name, param)
        self.logged: dict[str, torch.Tensor] = {}

    def record(self, key: str, value: torch.Tensor) -> None:
        self.logged[key] = value.detach()

    def record_terms(self, terms: LossTerms, prefix: str = "") -> torch.Tensor:
        """Record a loss function's named parts as `loss/{prefix}NAME`; returns the loss itself, untouched."""
        loss, parts = terms
        for name, value in parts.items():
            self.record(f"loss/{prefix}{name}", value)
        return loss

    @property
    def needs_groups(self) -> bool:
        return self.spec.groups

    @property
    def needs_negatives(self) -> bool:
        return self.spec.negatives

    @property
    def needs_tokens(self) -> bool:
        return self.spec.tokens(self.cfg)

    @property
    def uses_text(self) -> bool:
        return self.spec.uses_text

    def forward(self, model: ClipModel, image: torch.Tensor, text: torch.Tensor | None, extras: Extras) -> torch.Tensor:
        """Loss of a batch from its normalised features; `text` holds the captions then their negatives."""
        if self.spec.uses_text and text is None:
            raise ValueError(f"loss.name {self.name}: the objective needs the text features of the batch")
        self.logged = {}
        return self.spec.loss(self, model, image, text, extras)

    def dense(self, model: ClipModel, dense: Dense, extras: Extras) -> torch.Tensor:
        """The loss on pooled and token features (FSC-CLIP with its local loss)."""
        if self.spec.token_loss is None:
            raise ValueError(f"loss.name {self.name}: the objective has no loss on token features")
        self.logged = {}
        return self.spec.token_loss(self, model, dense, extras)


# ---------------------------------------------------------------------------------------------------------------
# The objectives


def _required(value: torch.Tensor | None, what: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"this objective needs the batch's {what}, but the data loader did not provide them")
    return value


def _scale(model: ClipModel) -> torch.Tensor:
    return model.logit_scale.float()


def _clip(obj: Objective, model: ClipModel, image: torch.Tensor, text: torch.Tensor, extras: Extras) -> torch.Tensor:
    return obj.record_terms(gathered_clip_terms(image, text, _scale(model), local_loss=obj.cfg.local_loss))


def _siglip_bias(cfg: LossConfig, model: ClipModel) -> dict[str, nn.Parameter]:
    """SigLIP's learnable bias, owned by the objective when the model has none of its own."""
    if model.logit_bias is not None:
        return {}
    return {"logit_bias": nn.Parameter(torch.tensor(float(cfg.siglip_bias_init)))}


def _siglip(obj: Objective, model: ClipModel, image: torch.Tensor, text: torch.Tensor, extras: Extras) -> torch.Tensor:
    own = obj._parameters.get("logit_bias")
    bias = own if own is not None else model.logit_bias
    obj.record("logit_bias", bias)
    return obj.record_terms(siglip_terms(image, text, _scale(model), bias.float()))


def _unicl(obj: Objective, model: ClipModel, image: torch.Tensor, text: torch.Tensor, extras: Extras) -> torch.Tensor:
    return obj.record_terms(unicl_terms(image, text, _scale(model), _required(extras.group, "group ids")))


def _split(text: torch.Tensor, extras: Extras) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(captions [B, D], negatives [B, N, D], mask [B, N]) of texts that are the captions then the negatives."""
    mask = _required(extras.negative_mask, "negative mask")
    batch, n = mask.shape
    return text[:batch], text[batch:].unflatten(0, (batch, n)), mask


def _negclip(obj: Objective, model: ClipModel, image: torch.Tensor, text: torch.Tensor, extras: Extras) -> torch.Tensor:
    positives, negatives, mask = _split(text, extras)
    return obj.record_terms(negclip_terms(image, positives, _scale(model), negatives, mask))


def _fsc(obj: Objective, model: ClipModel, image: torch.Tensor, text: torch.Tensor, extras: Extras) -> torch.Tensor:
    """NegCLIP plus FSC-CLIP's global hard-negative loss. The NegCLIP term is logged as `loss/negclip`, the mean of
    its directions `loss/negclip/image_to_text` and `loss/negclip/text_to_image`."""
    positives, negatives, mask = _split(text, extras)
    scale = _scale(model)
    loss = obj.record_terms(negclip_terms(image, positives, scale, negatives, mask), prefix="negclip/")
    obj.record("loss/negclip", loss)
    if obj.cfg.global_weight:
        gamma, eps = obj.cfg.focal_gamma, obj.cfg.negative_smoothing
        global_hn = global_hn_loss(image, positives, negatives, mask, scale, gamma, eps)
        obj.record("loss/global_hn", global_hn)
        loss = loss + obj.cfg.global_weight * global_hn
    return loss


def _fsc_tokens(obj: Objective, model: ClipModel, dense: Dense, extras: Extras) -> torch.Tensor:
    """FSC-CLIP with its local loss: the pooled objective plus the token-level hard-negative term."""
    loss = _fsc(obj, model, dense.image, dense.text, extras)
    batch = len(dense.image)
    mask = _required(extras.negative_mask, "negative mask")
    n = mask.shape[1]
    tokens, token_mask = dense.tokens, dense.token_mask
    local = local_hn_loss(
        dense.patches,
        tokens[:batch],
        token_mask[:batch],
        tokens[batch:].unflatten(0, (batch, n)),
        token_mask[batch:].unflatten(0, (batch, n)),
        mask,
        _scale(model),
        obj.cfg.focal_gamma,
        obj.cfg.negative_smoothing,
    )
    obj.record("loss/local_hn", local)
    return loss + obj.cfg.local_weight * local


def _ce(
    obj: Objective, model: ClipModel, image: torch.Tensor, text: torch.Tensor | None, extras: Extras
) -> torch.Tensor:
    labels = _required(extras.group, "class labels")
    return classification_loss(obj.cfg, model, image, labels, extras.targets)


_NEGATIVES = ("hard_negatives", "negative_kinds", "tagger")  # how many hard negatives, and how they are generated

# loss.name -> its spec. A new objective adds one line here (its function beside the others, or in its own module).
OBJECTIVES: dict[str, ObjectiveSpec] = {
    "clip": ObjectiveSpec(_clip),
    "siglip": ObjectiveSpec(_siglip, parameters=_siglip_bias, settings=("siglip_bias_init",)),
    "negclip": ObjectiveSpec(_negclip, negatives=True, settings=_NEGATIVES),
    "fsc": ObjectiveSpec(
        _fsc,
        negatives=True,
        tokens=lambda cfg: cfg.local_weight > 0,
        token_loss=_fsc_tokens,
        settings=(*_NEGATIVES, "global_weight", "local_weight", "focal_gamma", "negative_smoothing"),
    ),
    "unicl": ObjectiveSpec(_unicl, groups=True),
    "ce": ObjectiveSpec(
        _ce,
        groups=True,
        labelled=True,
        uses_text=False,
        prepare=with_class_head,
        settings=("label_smoothing",),
        mixes=True,
    ),
}


__all__ = ["CLASSIFIER_SCALE", "OBJECTIVES", "Dense", "Extras", "Objective", "ObjectiveSpec"]
