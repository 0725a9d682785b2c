"""The sigmoid loss of SigLIP (Zhai et al. 2023): every image-text pair is its own binary classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptune.losses.gather import LossTerms
from cliptune.losses.reduce import check_pairs, gather_features, global_mean, logged_means, row_layout, upcast


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's loss of the global batch (`siglip_terms`)."""
    return siglip_terms(image_features, text_features, logit_scale, logit_bias)[0]


def siglip_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> LossTerms:
    """-(1/B) sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)), z_ij = 1 for the matching pair and -1 otherwise.

    Features are L2-normalised, row i of each describing the same pair; `logit_scale` is the log of t and `logit_bias`
    the learnable b (SigLIP initialises them at log 10 and -10). t = exp(logit_scale) is NOT clamped at 100, as in
    SigLIP and open_clip's `SigLipLoss`: the bias, not a temperature cap, keeps the sigmoid loss stable.

    Distributed: this rank's images against the texts of all ranks (the positive of local row i is global column
    offset + i), each rank summing its rows' terms; the value is the global loss on every rank and the gradient follows
    the convention of `gathered_clip_loss` (back-propagate it as is under DDP). open_clip exchanges texts between
    neighbouring ranks instead of gathering them: the same sum, in a different order.

    Returned with the loss, detached, the share of the matching pairs and that of the others (the loss is their sum):
    whether training pulls the pairs together or pushes the non-matching ones apart.
    """
    check_pairs(image_features, text_features)
    image_features, text_features = upcast(image_features), upcast(text_features)
    n = image_features.shape[0]
    sizes, offset = row_layout(n, image_features.device)
    all_texts = gather_features(text_features, sizes)
    logits = logit_scale.exp() * image_features @ all_texts.T + logit_bias
    rows = torch.arange(n, device=logits.device)
    signs = -torch.ones_like(logits)
    signs[rows, offset + rows] = 1.0
    terms = -F.logsigmoid(signs * logits)
    total = terms.sum()
    positive = terms[rows, offset + rows].sum()
    parts = logged_means({"positive_pairs": positive, "negative_pairs": total - positive}, n)
    return global_mean(total, n), parts
