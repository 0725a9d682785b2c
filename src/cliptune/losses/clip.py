"""Symmetric InfoNCE (the CLIP loss) with a learnable, clamped temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# CLIP clamps the inverse temperature at 100 so the logits cannot blow up early in training.
MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss_directions(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image->text and the text->image cross-entropy over the batch, whose mean is `clip_loss`.

    Features are L2-normalised, row i of each describing the same pair; `logit_scale` is the *log* of the inverse
    temperature (the model parameter), exponentiated and clamped at 100 here.
    """
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the batch (`clip_loss_directions`)."""
    image_to_text, text_to_image = clip_loss_directions(image_features, text_features, logit_scale)
    return (image_to_text + text_to_image) / 2
