"""Image-caption retrieval evaluation of a model on a caption table (CLIP_benchmark convention)."""

from __future__ import annotations

import torch

from cliptune import metrics
from cliptune.data import CaptionTable
from cliptune.features.encoding import Encoding
from cliptune.losses.clip import clip_loss


def evaluate_retrieval(encoding: Encoding, table: CaptionTable, loss_batch: int | None = None) -> dict[str, float]:
    """i2t/t2i R@1/5/10 and mean recall in percent, every caption of an image counted as its own query; with
    `loss_batch`, also `loss`: the validation loss (see `validation_loss`)."""
    captions, text_to_image = table.flat()
    encoding.report_overflow(captions, f"eval set {table.name!r}")
    images, texts = encoding.images(table.images), encoding.texts(captions)
    out = metrics.retrieval(images, texts, text_to_image)
    if loss_batch:
        out["loss"] = validation_loss(images, texts, text_to_image, encoding.model.logit_scale, loss_batch)
    return out


@torch.no_grad()
def validation_loss(
    images: torch.Tensor, texts: torch.Tensor, text_to_image: list[int], logit_scale: torch.Tensor, batch: int
) -> float:
    """CLIP's loss at the model's temperature on (image, its first caption) pairs in consecutive batches of `batch`,
    averaged over pairs: open_clip's `val_loss` convention, so it compares with the training loss of that batch size."""
    first = {}
    for j, i in enumerate(text_to_image):
        first.setdefault(i, j)
    pairs_text = texts[[first[i] for i in range(len(images))]]
    scale = logit_scale.detach().float().cpu()
    total = 0.0
    for start in range(0, len(images), batch):
        piece = slice(start, start + batch)
        size = len(images[piece])
        if size > 1:  # one pair alone has no negative
            total += clip_loss(images[piece].float(), pairs_text[piece].float(), scale).item() * size
    return total / len(images)
