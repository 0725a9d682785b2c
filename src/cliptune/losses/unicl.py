"""Label-aware contrastive targets (UniCL, Yang et al. 2022): pairs of one group are positives of each other.

Plain InfoNCE treats two images of the same class, or two identical captions, in one batch as negatives of each other
(false negatives). UniCL's target for a row is instead uniform over every column of its group.
"""

from __future__ import annotations

import torch

from cliptune.losses.gather import LossTerms
from cliptune.losses.reduce import (
    check_pairs,
    clamped_scale,
    gather_features,
    gather_values,
    global_mean,
    logged_means,
    row_layout,
    upcast,
)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of -sum_j target_ij log softmax(logits_i)_j."""
    return -(targets * logits.log_softmax(dim=-1)).sum()


def unicl_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """(soft-CE image->text + soft-CE text->image) / 2, targets uniform over the row's group (`unicl_terms`)."""
    return unicl_terms(image_features, text_features, logit_scale, labels)[0]


def unicl_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    labels: torch.Tensor,
) -> LossTerms:
    """(soft-CE image->text + soft-CE text->image) / 2 with targets uniform over the columns of the row's group.

    `labels` (B,) int64 are group ids (equal ids: positives of each other, e.g. a class or
    `data.datasets.caption_groups`); ids must mean the same on every rank. Features are L2-normalised, `logit_scale`
    is clamped at log 100 as in `clip_loss`, which this equals when all labels differ. Distributed: features and
    labels are gathered, each rank computes its rows against all columns, with the convention of
    `gathered_clip_loss` (back-propagate the value as is). Returned with the loss: each direction's global mean,
    detached (the loss is their mean).
    """
    check_pairs(image_features, text_features)
    if labels.shape != (image_features.shape[0],) or labels.dtype != torch.long:
        raise ValueError(
            f"labels must be an int64 tensor of shape ({image_features.shape[0]},) (one group id per pair), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    image_features, text_features = upcast(image_features), upcast(text_features)
    n = image_features.shape[0]
    sizes, _ = row_layout(n, image_features.device)
    all_images = gather_features(image_features, sizes)
    all_texts = gather_features(text_features, sizes)
    all_labels = gather_values(labels.to(image_features.device), sizes)

    # The same-group relation is symmetric, so one target matrix serves both directions.
    same = (labels.to(image_features.device)[:, None] == all_labels[None, :]).to(image_features.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    scale = clamped_scale(logit_scale)
    image_to_text = _soft_cross_entropy(scale * image_features @ all_texts.T, targets)
    text_to_image = _soft_cross_entropy(scale * text_features @ all_images.T, targets)
    parts = logged_means({"image_to_text": image_to_text, "text_to_image": text_to_image}, n)
    return global_mean((image_to_text + text_to_image) / 2, n), parts
