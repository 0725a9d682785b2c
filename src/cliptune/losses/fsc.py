"""FSC-CLIP (Oh et al. 2024): NegCLIP plus global and local hard-negative losses, calibrated by focal loss and
label smoothing so that compositionality improves without losing the pre-trained multi-modal abilities.

Total = negclip_loss + W_GLOBAL * global_hn_loss + W_LOCAL * local_hn_loss. Both hard-negative (HN) losses are a
(1+N)-way classification of each image between its caption (column 0) and that caption's N hard negatives, scored
globally (pooled features) or locally (text tokens against the image patches they attend to). Differences from the
FSC-CLIP code, on purpose: a missing negative is left out of the softmax (FSC-CLIP scores a zero vector, so a logit
of 0 stays in it), and under DDP the HN losses are the mean over the rows of the whole global batch that have a
valid negative (FSC-CLIP averages per rank, a different value when ranks hold different numbers of such rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptune.losses.negclip import check_negatives, negclip_loss
from cliptune.losses.reduce import clamped_scale, global_mean, upcast

W_GLOBAL = 0.5
W_LOCAL = 0.2
FOCAL_GAMMA = 2.0
LABEL_SMOOTHING = 0.02


def focal_smoothed_ce(
    logits: torch.Tensor, valid: torch.Tensor, gamma: float = FOCAL_GAMMA, epsilon: float = LABEL_SMOOTHING
) -> torch.Tensor:
    """Focal, label-smoothed cross-entropy of rows whose column 0 is the positive, averaged over rows with a negative.

    `logits` (B, K); `valid` (B, K) bool, True in column 0 and at the negatives that exist. With K_i valid columns in
    row i the target is 1 - eps + eps/K_i at column 0, eps/K_i at each valid negative and 0 elsewhere; invalid columns
    are left out of the softmax. loss_i = sum_k -target_k (1 - p_k)^gamma log p_k: as in the FSC-CLIP code the focal
    weight multiplies every class term of the smoothed cross-entropy, not only the positive's. A row with no valid
    negative is a 1-way problem of loss 0; it is left out of the mean (FSC-CLIP does the same), and with no such row
    anywhere the loss is 0, still attached to the graph. Distributed: the mean runs over the rows of all ranks.
    """
    if logits.dim() != 2 or valid.shape != logits.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor shaped like logits (rows, classes), got logits {tuple(logits.shape)} and "
            f"valid {valid.dtype} {tuple(valid.shape)}"
        )
    if not valid[:, 0].all():
        raise ValueError("column 0 of every row is the positive and must be valid (valid[:, 0] all True)")
    if gamma < 0 or not 0 <= epsilon <= 1:
        raise ValueError(f"need gamma >= 0 and 0 <= epsilon <= 1 (loss.gamma, loss.epsilon), got {gamma}, {epsilon}")
    logits = upcast(logits)
    has_negative = valid[:, 1:].any(dim=1)
    # Row selection (not masking) keeps the trivial rows out of the graph entirely.
    logits, valid = logits[has_negative], valid[has_negative]
    log_p = logits.masked_fill(~valid, float("-inf")).log_softmax(dim=-1)
    # Invalid columns hold log p = -inf; zeroing it here (their target is 0) keeps 0 * inf out of value and gradient.
    log_p = log_p.masked_fill(~valid, 0.0)
    targets = valid.to(logits.dtype) * (epsilon / valid.sum(dim=1, keepdim=True).to(logits.dtype))
    targets[:, 0] += 1 - epsilon
    focal = (-torch.expm1(log_p)) ** gamma  # 1 - p, accurate where p is close to 1
    return global_mean(-(targets * focal * log_p).sum(), has_negative.sum())


def global_hn_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    negative_features: torch.Tensor,
    negative_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    gamma: float = FOCAL_GAMMA,
    epsilon: float = LABEL_SMOOTHING,
) -> torch.Tensor:
    """`focal_smoothed_ce` of s * [<i, t+>, <i, t-_1>, ..., <i, t-_N>] for each image i and its caption's negatives.

    Features are L2-normalised (negatives (B, N, D), mask (B, N) False where missing); s is the inverse temperature,
    clamped at 100 as in `clip_loss`. Each row only reads its own pair, so nothing is gathered; the mean over rows with
    a valid negative is global (see `focal_smoothed_ce`).
    """
    check_negatives(text_features, negative_features, negative_mask)
    image_features, text_features = upcast(image_features), upcast(text_features)
    # Zero the missing negatives before the product: their logits are excluded anyway, and this keeps whatever they
    # hold (even NaN) out of the gradient of the images.
    negatives = upcast(negative_features).masked_fill(~negative_mask[..., None], 0.0)
    candidates = torch.cat([text_features[:, None], negatives], dim=1)  # (B, 1+N, D)
    logits = clamped_scale(logit_scale) * torch.einsum("bd,bkd->bk", image_features, candidates)
    valid = torch.cat([torch.ones_like(negative_mask[:, :1]), negative_mask], dim=1)
    return focal_smoothed_ce(logits, valid, gamma, epsilon)


def token_similarity(
    patch_tokens: torch.Tensor, text_tokens: torch.Tensor, text_token_mask: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """FSC-CLIP's local score S(I, T) (B,) of each image's patches (B, P, D) with its text's tokens (B, L, D).

    A = <T_t, V_p>, detached, is min-max normalised over the patches and each token's row renormalised to sum 1
    (uniform where all patches score the same, which min-max would turn into 0/0); v_t = normalise(sum_p A_tp V_p);
    s_t = s * <v_t, normalise(T_t)> with s clamped at 100; S = logsumexp of s_t over the tokens where
    `text_token_mask` (B, L) is True (the caller leaves out the start and padding tokens). Tokens need not be
    normalised (FSC-CLIP passes the projected final-norm outputs).
    """
    if patch_tokens.dim() != 3 or text_tokens.dim() != 3 or patch_tokens.shape[::2] != text_tokens.shape[::2]:
        raise ValueError(
            f"patch_tokens (B, P, D) and text_tokens (B, L, D) must agree in B and D, got "
            f"{tuple(patch_tokens.shape)} and {tuple(text_tokens.shape)}"
        )
    if text_token_mask.dtype != torch.bool or text_token_mask.shape != text_tokens.shape[:2]:
        raise ValueError(f"text_token_mask must be a bool tensor of shape {tuple(text_tokens.shape[:2])}")
    if not text_token_mask.any(dim=1).all():
        raise ValueError("every text needs at least one token in text_token_mask (True at the caption's words)")
    patch_tokens, text_tokens = upcast(patch_tokens), upcast(text_tokens)
    attention = torch.einsum("bld,bpd->blp", text_tokens, patch_tokens).detach()
    low, high = attention.amin(dim=-1, keepdim=True), attention.amax(dim=-1, keepdim=True)
    spread = high - low
    flat = spread == 0
    attention = ((attention - low) / spread.masked_fill(flat, 1.0)).masked_fill(flat, 1.0)
    attention = attention / attention.sum(dim=-1, keepdim=True)
    grouped = F.normalize(torch.einsum("blp,bpd->bld", attention, patch_tokens), dim=-1)
    scores = clamped_scale(logit_scale) * (grouped * F.normalize(text_tokens, dim=-1)).sum(dim=-1)
    return scores.masked_fill(~text_token_mask, float("-inf")).logsumexp(dim=-1)


def local_hn_loss(
    patch_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_token_mask: torch.Tensor,
    negative_tokens: torch.Tensor,
    negative_token_mask: torch.Tensor,
    negative_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    gamma: float = FOCAL_GAMMA,
    epsilon: float = LABEL_SMOOTHING,
) -> torch.Tensor:
    """`focal_smoothed_ce` of [S(I, T+), S(I, T-_1), ..., S(I, T-_N)] (`token_similarity`), each image's own patches
    scoring its caption and that caption's negatives.

    `negative_tokens` (B, N, L2, D) with `negative_token_mask` (B, N, L2) are the tokens of the hard negatives,
    `negative_mask` (B, N) False where a negative is missing: a missing one is never scored (its tokens may hold
    anything). Per-row, nothing gathered; the mean over rows with a valid negative is global.
    """
    b, n = negative_mask.shape
    if negative_tokens.shape[:2] != (b, n) or negative_token_mask.shape != negative_tokens.shape[:3]:
        raise ValueError(
            f"negative_tokens (B, N, L, D) and negative_token_mask (B, N, L) must match negative_mask {(b, n)}, got "
            f"{tuple(negative_tokens.shape)} and {tuple(negative_token_mask.shape)}"
        )
    positive = token_similarity(patch_tokens, text_tokens, text_token_mask, logit_scale)
    rows, columns = negative_mask.nonzero(as_tuple=True)
    negative = token_similarity(
        patch_tokens[rows], negative_tokens[rows, columns], negative_token_mask[rows, columns], logit_scale
    )
    negative_scores = positive.new_full((b, n), float("-inf")).index_put((rows, columns), negative)
    logits = torch.cat([positive[:, None], negative_scores], dim=1)
    valid = torch.cat([torch.ones_like(negative_mask[:, :1]), negative_mask], dim=1)
    return focal_smoothed_ce(logits, valid, gamma, epsilon)


def fsc_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_features: torch.Tensor,
    negative_mask: torch.Tensor,
    patch_tokens: torch.Tensor | None = None,
    text_tokens: torch.Tensor | None = None,
    text_token_mask: torch.Tensor | None = None,
    negative_tokens: torch.Tensor | None = None,
    negative_token_mask: torch.Tensor | None = None,
    w_global: float = W_GLOBAL,
    w_local: float = W_LOCAL,
    gamma: float = FOCAL_GAMMA,
    epsilon: float = LABEL_SMOOTHING,
) -> torch.Tensor:
    """negclip_loss + w_global * global_hn_loss + w_local * local_hn_loss (the local term only with the tokens).

    The five token arguments come all together (see `local_hn_loss`) or not at all; without them the local term is
    skipped. Focal weighting and label smoothing (`gamma`, `epsilon`) apply to the two hard-negative losses only.
    """
    tokens = (patch_tokens, text_tokens, text_token_mask, negative_tokens, negative_token_mask)
    if any(t is None for t in tokens) and any(t is not None for t in tokens):
        raise ValueError(
            "fsc_loss needs all of patch_tokens, text_tokens, text_token_mask, negative_tokens and "
            "negative_token_mask for the local hard-negative term, or none of them to skip it"
        )
    loss = negclip_loss(image_features, text_features, logit_scale, negative_features, negative_mask)
    loss = loss + w_global * global_hn_loss(
        image_features, text_features, negative_features, negative_mask, logit_scale, gamma, epsilon
    )
    if patch_tokens is not None:
        loss = loss + w_local * local_hn_loss(*tokens, negative_mask, logit_scale, gamma, epsilon)
    return loss
