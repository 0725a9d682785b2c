"""NegCLIP (Yuksekgonul et al. 2023): the CLIP loss with hard-negative captions added to the image->text softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def check_negatives(text_features: torch.Tensor, negative_features: torch.Tensor, negative_mask: torch.Tensor) -> None:
    """Raise if the hard negatives (B, N, D) and their mask (B, N) do not fit the B captions of dimension D."""
    b, d = text_features.shape
    if negative_features.dim() != 3 or negative_features.shape[0] != b or negative_features.shape[2] != d:
        raise ValueError(
            f"negative_features must have shape (batch, negatives per caption, dim) = ({b}, N, {d}), got "
            f"{tuple(negative_features.shape)}"
        )
    if negative_mask.dtype != torch.bool or negative_mask.shape != negative_features.shape[:2]:
        raise ValueError(
            f"negative_mask must be a bool tensor of shape {tuple(negative_features.shape[:2])} (False where a caption "
            f"has no negative), got {negative_mask.dtype} {tuple(negative_mask.shape)}"
        )


def negclip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_features: torch.Tensor,
    negative_mask: torch.Tensor,
) -> torch.Tensor:
    """(CE image->text + CE text->image) / 2 with the batch's hard negatives in image->text (`negclip_terms`)."""
    return negclip_terms(image_features, text_features, logit_scale, negative_features, negative_mask)[0]


def negclip_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_features: torch.Tensor,
    negative_mask: torch.Tensor,
) -> LossTerms:
    """(CE image->text + CE text->image) / 2, where every image also scores the valid hard negatives of the batch.

    `negative_features` (B, N, D) are the L2-normalised hard-negative captions made from each caption, `negative_mask`
    (B, N) is False where there is none. As NegCLIP appends the negatives to the text batch, the image->text
    candidates of every image are all B captions plus every valid negative of the whole batch; a missing negative is
    left out of the softmax, never scored as a zero vector (FSC-CLIP's zero vectors keep a logit of 0 in it). The
    text->image direction is plain CLIP. `logit_scale` is clamped at log 100 as in `clip_loss`, which this equals
    when no negative is valid.

    Distributed: captions, negatives and masks are gathered (N must be equal on all ranks); each rank computes its
    rows against all candidates, with the convention of `gathered_clip_loss` (back-propagate the value as is).
    Returned with the loss: each direction's global mean, detached (the loss is their mean).
    """
    check_pairs(image_features, text_features)
    check_negatives(text_features, negative_features, negative_mask)
    image_features, text_features = upcast(image_features), upcast(text_features)
    negative_features = upcast(negative_features)
    n = image_features.shape[0]
    sizes, offset = row_layout(n, image_features.device)
    all_images = gather_features(image_features, sizes)
    all_texts = gather_features(text_features, sizes)
    # Boolean selection, not masking of logits: invalid negatives (whatever their values) never enter the graph.
    all_negatives = gather_features(negative_features, sizes)[gather_values(negative_mask, sizes)]
    candidates = torch.cat([all_texts, all_negatives])

    scale = clamped_scale(logit_scale)
    labels = torch.arange(offset, offset + n, device=image_features.device)
    image_to_text = F.cross_entropy(scale * image_features @ candidates.T, labels, reduction="sum")
    text_to_image = F.cross_entropy(scale * text_features @ all_images.T, labels, reduction="sum")
    parts = logged_means({"image_to_text": image_to_text, "text_to_image": text_to_image}, n)
    return global_mean((image_to_text + text_to_image) / 2, n), parts
