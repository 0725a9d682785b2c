"""`loss.name` as a module: which inputs an objective needs, the parameters it owns, and its loss on a batch.

Every loss here is the multi-process (gathered) form, which is the plain single-process loss when there is no
process group; see `cliptune.losses.gather` for the gradient convention DDP relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.config import ConfigError, LossConfig
from cliptune.losses.fsc import global_hn_loss, local_hn_loss
from cliptune.losses.gather import gathered_clip_loss
from cliptune.losses.negclip import negclip_loss
from cliptune.losses.reduce import global_mean
from cliptune.losses.siglip import siglip_loss
from cliptune.losses.unicl import unicl_loss
from cliptune.models.base import ClipModel

# FT-CLIP / zero-shot logits use CLIP's fixed scale, so that step 0 reproduces zero-shot predictions and logits.
CLASSIFIER_SCALE = 100.0


@dataclass
class Extras:
    """Per-batch inputs besides the features: group ids (label-aware targets) and which negatives exist."""

    group: torch.Tensor | None = None  # [B]
    negative_mask: torch.Tensor | None = None  # [B, N]


@dataclass
class Dense:
    """Pooled and per-token features of a batch whose texts are the captions followed by their negatives."""

    image: torch.Tensor  # [B, D] normalised
    patches: torch.Tensor  # [B, P, D]
    text: torch.Tensor  # [B + B*N, D] normalised
    tokens: torch.Tensor  # [B + B*N, L, D]
    token_mask: torch.Tensor  # [B + B*N, L]


class Objective(nn.Module):
    """The configured training objective; owns SigLIP's logit bias when the model has none."""

    def __init__(self, cfg: LossConfig, model: ClipModel) -> None:
        super().__init__()
        self.cfg, self.name = cfg, cfg.name
        self.logit_bias: nn.Parameter | None = None
        if self.name == "siglip" and getattr(model, "logit_bias", None) is None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.siglip_bias_init)))

    @property
    def needs_groups(self) -> bool:
        return self.name in ("unicl", "ce")

    @property
    def needs_negatives(self) -> bool:
        return self.name in ("negclip", "fsc")

    @property
    def needs_tokens(self) -> bool:
        return self.name == "fsc" and self.cfg.local_weight > 0

    @property
    def uses_text(self) -> bool:
        return self.name != "ce"

    def forward(self, model: ClipModel, image: torch.Tensor, text: torch.Tensor | None, extras: Extras) -> torch.Tensor:
        """Loss of a batch from its normalised features; `text` holds the captions then their negatives."""
        scale = model.logit_scale.float()
        if self.name == "ce":
            return self._classification(model, image, extras)
        assert text is not None
        if self.name == "clip":
            return gathered_clip_loss(image, text, scale, local_loss=self.cfg.local_loss)
        if self.name == "siglip":
            bias = self.logit_bias if self.logit_bias is not None else model.logit_bias
            return siglip_loss(image, text, scale, bias.float())
        if self.name == "unicl":
            return unicl_loss(image, text, scale, _required(extras.group, "group ids"))
        positives, negatives, mask = self._split(text, extras)
        loss = negclip_loss(image, positives, scale, negatives, mask)
        if self.name == "fsc" and self.cfg.global_weight:
            loss = loss + self.cfg.global_weight * self._global(image, positives, negatives, mask, scale)
        return loss

    def dense(self, model: ClipModel, dense: Dense, extras: Extras) -> torch.Tensor:
        """FSC-CLIP with its local loss: the pooled objective plus the token-level hard-negative term."""
        loss = self.forward(model, dense.image, dense.text, extras)
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
            model.logit_scale.float(),
            self.cfg.focal_gamma,
            self.cfg.negative_smoothing,
        )
        return loss + self.cfg.local_weight * local

    def _global(
        self,
        image: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        mask: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        gamma, eps = self.cfg.focal_gamma, self.cfg.negative_smoothing
        return global_hn_loss(image, positives, negatives, mask, scale, gamma, eps)

    def _split(self, text: torch.Tensor, extras: Extras) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = _required(extras.negative_mask, "negative mask")
        batch, n = mask.shape
        return text[:batch], text[batch:].unflatten(0, (batch, n)), mask

    def _classification(self, model: ClipModel, image: torch.Tensor, extras: Extras) -> torch.Tensor:
        labels = _required(extras.group, "class labels")
        weights = getattr(model, "class_weights", None)
        if weights is None:
            raise ConfigError("loss.name ce: the model has no class head; train it on data.labelled")
        logits = CLASSIFIER_SCALE * image @ weights.float().T
        per_sample = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing, reduction="none")
        return global_mean(per_sample.sum(), len(per_sample))


def _required(value: torch.Tensor | None, what: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"this objective needs the batch's {what}, but the data loader did not provide them")
    return value


__all__ = ["CLASSIFIER_SCALE", "Dense", "Extras", "Objective"]
