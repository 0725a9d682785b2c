"""What every objective loss shares: the layout of the global batch over ranks, gathers, and the global mean.

The losses follow `gathered_clip_loss`'s convention (see the docstring of cliptune/losses/gather.py): each rank passes
its own rows and returns the value of the loss on the batch concatenated over ranks, and the gradient it
back-propagates makes the per-rank gradients sum to world_size times the single-process gradient, which DDP's
averaging of parameter gradients turns into exactly the single-process gradient. Without a process group (or with one
rank) every helper here is the identity of the single-process computation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cliptune.losses.clip import MAX_LOGIT_SCALE
from cliptune.losses.gather import _distributed, _gather_rows, _gather_sizes

__all__ = [
    "check_pairs",
    "clamped_scale",
    "gather_features",
    "gather_values",
    "global_mean",
    "logged_means",
    "row_layout",
    "upcast",
]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is in a 16-bit float type (bf16, fp16): softmaxes over large batches need the range."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def clamped_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The inverse temperature from its log, clamped at 100 as in `clip_loss` (no gradient above the clamp)."""
    return logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"image and text features must have the same number of rows, got {image_features.shape[0]} and "
            f"{text_features.shape[0]}"
        )


def row_layout(n: int, device: torch.device) -> tuple[list[int], int]:
    """Number of rows on every rank (rank order) and the global index of this rank's first row."""
    sizes = _gather_sizes(n, device) if _distributed() else [n]
    if sum(sizes) == 0:
        raise ValueError("the global batch is empty on every rank")
    offset = sum(sizes[: dist.get_rank()]) if _distributed() else 0
    return sizes, offset


def gather_features(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows of `x` concatenated over ranks with gradient (`sizes` from `row_layout`); `x` itself on one rank."""
    return _gather_rows(x, sizes) if _distributed() else x


def gather_values(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows of `x` (labels, masks: no gradient) concatenated over ranks; `x` itself on one rank."""
    if not _distributed():
        return x
    # Padded to the largest rank for the collective, as in `_gather_rows`; bool travels as uint8 (not every backend
    # reduces or gathers bool tensors).
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x
    wire = F.pad(wire, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0]))
    parts = [torch.empty_like(wire) for _ in sizes]
    dist.all_gather(parts, wire.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(x.dtype)


def global_mean(local_sum: torch.Tensor, local_count: int | torch.Tensor) -> torch.Tensor:
    """Mean over the global batch of per-sample terms; `local_sum` sums this rank's `local_count` terms.

    The value is (sum of every rank's terms) / (total count), the same on every rank. The gradient is that of
    `local_sum * world / total`: the ranks' contributions sum to world_size times the gradient of the mean, which is
    what DDP's averaging expects (the terms may read gathered features, whose backward sums over ranks as well). A
    rank with no terms contributes 0; with no term anywhere the result is 0 (a sum over nothing, still in the graph).
    """
    count = torch.as_tensor(local_count, dtype=local_sum.dtype, device=local_sum.device)
    if not _distributed():
        return local_sum / count.clamp(min=1)
    # One collective for both: the value of the global sum and the total count that scales the gradient.
    totals = torch.stack([local_sum.detach(), count])
    dist.all_reduce(totals)
    total = totals[1].clamp(min=1)
    share = local_sum * (dist.get_world_size() / total)
    return share + (totals[0] / total - share.detach())


def logged_means(local_sums: dict[str, torch.Tensor], local_count: int) -> dict[str, torch.Tensor]:
    """Detached global means of named per-sample sums (a loss's parts, for the training log; one collective).

    They never enter the loss: its value and gradient stay those of `global_mean` on the total."""
    names = list(local_sums)
    sums = torch.stack([local_sums[name].detach() for name in names])
    count = float(local_count)
    if _distributed():
        totals = torch.cat([sums, sums.new_tensor([count])])
        dist.all_reduce(totals)
        sums, count = totals[:-1], float(totals[-1])
    return {name: value / max(count, 1.0) for name, value in zip(names, sums)}
