"""Training objectives, chosen by name in the config (`loss.name`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cliptune.losses.clip import MAX_LOGIT_SCALE, clip_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# loss.name -> loss(image_features, text_features, logit_scale)
LOSSES: dict[str, LossFn] = {"clip": clip_loss}

__all__ = ["LOSSES", "MAX_LOGIT_SCALE", "LossFn", "clip_loss"]
