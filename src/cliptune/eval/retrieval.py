"""Image-caption retrieval evaluation of a model on a caption table (CLIP_benchmark convention)."""

from __future__ import annotations

from cliptune import metrics
from cliptune.data import CaptionTable
from cliptune.eval.encode import encode_images, encode_texts
from cliptune.models.base import ClipModel


def evaluate_retrieval(
    model: ClipModel, table: CaptionTable, batch_size: int = 64, precision: str = "fp32", workers: int = 0
) -> dict[str, float]:
    """i2t/t2i R@1/5/10 and mean recall in percent, every caption of an image counted as its own query."""
    captions, text_to_image = table.flat()
    image_emb = encode_images(model, table.images, batch_size, precision, workers)
    text_emb = encode_texts(model, captions, batch_size, precision)
    return metrics.retrieval(image_emb, text_emb, text_to_image)
