"""The CLIP loss over the global batch of a multi-process (DDP) run.

Each rank holds the features of its own sub-batch. `gather_with_grad` concatenates them over ranks *with* gradient
(torch's autograd-aware `torch.distributed.nn.functional.all_gather`), so every rank's features get gradient from the
negatives they are on every other rank. `gathered_clip_loss` is `clip_loss` on the concatenated batch: either every rank
computes the full global logits (`local_loss=False`), or only its local rows against all columns (`local_loss=True`,
about world-size times less logit memory and compute), with labels offset by the number of rows on earlier ranks.

Gradient convention (no scaling by the caller). The value returned on every rank is the global loss L, and the backward
pass of the gathers sums the gradient that every rank sends to a rank's rows. Per-rank gradients therefore *sum* to
world_size * dL/d(that rank's parameters); DistributedDataParallel divides the summed parameter gradients by world_size,
which gives exactly dL/dθ of the single-process loss on the concatenated batch. Consequences, all tested:

* the raw `.grad` of a rank's local features is world_size times the single-process gradient of those rows (it is
  DDP's averaging of the parameter gradients downstream that divides it out: do not scale the loss by world_size, and do
  not divide it either);
* `logit_scale`, a replicated parameter that is not gathered, gets dL/d(logit_scale) once averaged over ranks (with
  `local_loss` each rank holds world_size times the gradient of its own rows' share, otherwise every rank holds the full
  gradient).

Local batch sizes may differ between ranks (the last batch of an epoch, say): the sizes are gathered on every call, the
features are padded to the largest size for the collective and unpadded after it, labels are offset by the rows of the
earlier ranks, and with `local_loss` each rank's share of the loss is weighted by its number of rows, so the value and
gradients are still those of the concatenated batch. Without a process group (or with one rank) both functions reduce to
the single-process ones.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from cliptune.losses.clip import MAX_LOGIT_SCALE, clip_loss_directions

__all__ = ["LossTerms", "directions", "gather_with_grad", "gathered_clip_loss", "gathered_clip_terms"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """Number of rows (dim 0) on every rank, in rank order."""
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Differentiable concatenation over ranks of `x`, whose number of rows on rank r is `sizes[r]`."""
    largest = max(sizes)
    padded = x
    if x.shape[0] != largest:  # the collective needs equal shapes: pad dim 0 with zeros, cut the padding off after
        padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, largest - x.shape[0]))
    with warnings.catch_warnings():
        # torch >= 2.6 marks torch.distributed.nn.functional as deprecated in favour of the private functional
        # collectives, whose backward needs reduce_scatter (missing on gloo); this one works on every backend.
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional", category=FutureWarning)
        parts = dist_fn.all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (in rank order, along dim 0) of `x`, with gradient.

    In the backward pass each rank's `x` receives the sum over all ranks of the gradient reaching its rows of the
    gathered tensor. The number of rows may differ between ranks; the other dimensions must match. Returns `x` itself
    when torch.distributed is not initialised or the world has one rank.
    """
    if not _distributed():
        return x
    return _gather_rows(x, _gather_sizes(x.shape[0], x.device))


# A loss with its gradient, and its named parts: detached values on the global batch, for the training log.
LossTerms = tuple[torch.Tensor, dict[str, torch.Tensor]]


def gathered_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    local_loss: bool = True,
) -> torch.Tensor:
    """`clip_loss` over the batch concatenated from all ranks; every rank returns the same value.

    `image_features` / `text_features` are this rank's L2-normalised rows (row i of each is one pair); `logit_scale` is
    the log inverse temperature, clamped at log 100 as in `clip_loss`. With `local_loss` a rank computes only its rows
    of the image->text and text->image logits (local x global) with labels offset by the rows on earlier ranks (rank *
    local_batch when sizes are equal); otherwise every rank computes the full global logits. Back-propagate the returned
    value as is: DDP's averaging of parameter gradients then yields the single-process gradient (see module docstring).
    """
    return gathered_clip_terms(image_features, text_features, logit_scale, local_loss)[0]


def gathered_clip_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    local_loss: bool = True,
) -> LossTerms:
    """`gathered_clip_loss` and the global mean of each direction's cross-entropy (the loss is their mean)."""
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"image and text features must have the same number of rows, got {image_features.shape[0]} and "
            f"{text_features.shape[0]}"
        )
    if not _distributed():
        return _terms(*clip_loss_directions(image_features, text_features, logit_scale))

    n = image_features.shape[0]
    sizes = _gather_sizes(n, image_features.device)
    total = sum(sizes)
    if total == 0:
        raise ValueError("the global batch is empty on every rank")
    all_images = _gather_rows(image_features, sizes)
    all_texts = _gather_rows(text_features, sizes)
    if not local_loss:
        return _terms(*clip_loss_directions(all_images, all_texts, logit_scale))

    rank, world = dist.get_rank(), dist.get_world_size()
    offset = sum(sizes[:rank])
    labels = torch.arange(offset, offset + n, device=image_features.device)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    # Summed (not averaged) over local rows, so a rank's share is weighted by its rows and an empty rank adds 0.
    image_to_text = F.cross_entropy(scale * image_features @ all_texts.T, labels, reduction="sum")
    text_to_image = F.cross_entropy(scale * text_features @ all_images.T, labels, reduction="sum")
    summed = image_to_text + text_to_image
    # Gradient source: the per-rank terms sum to world * L, like the world copies of L in the non-local branch.
    share = summed * (world / (2 * total))
    # Value: the global loss L (sum of every rank's terms), so that each rank reports the loss of the whole batch;
    # the directions' sums travel in the same collective.
    global_sums = torch.stack([summed, image_to_text, text_to_image]).detach()
    dist.all_reduce(global_sums)
    value = global_sums[0] / (2 * total)
    return share + (value - share.detach()), directions(global_sums[1] / total, global_sums[2] / total)


def directions(image_to_text: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two directions of a contrastive loss, detached, under their names in the training log."""
    return {"image_to_text": image_to_text.detach(), "text_to_image": text_to_image.detach()}


def _terms(image_to_text: torch.Tensor, text_to_image: torch.Tensor) -> LossTerms:
    """The loss as `clip_loss` computes it (the same operations, so the same bits) and its directions."""
    return (image_to_text + text_to_image) / 2, directions(image_to_text, text_to_image)
