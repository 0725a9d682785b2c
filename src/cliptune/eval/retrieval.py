"""Image-caption retrieval evaluation of a model on a caption table (CLIP_benchmark convention)."""

from __future__ import annotations

from cliptune import metrics
from cliptune.data import CaptionTable
from cliptune.eval.encode import Encoding


def evaluate_retrieval(encoding: Encoding, table: CaptionTable) -> dict[str, float]:
    """i2t/t2i R@1/5/10 and mean recall in percent, every caption of an image counted as its own query."""
    captions, text_to_image = table.flat()
    return metrics.retrieval(encoding.images(table.images), encoding.texts(captions), text_to_image)
