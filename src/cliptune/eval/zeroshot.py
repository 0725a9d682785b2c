"""Zero-shot classification: a classifier built from prompt templates, scored on labelled images."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptune import metrics
from cliptune.data import LabelledImages
from cliptune.eval.encode import encode_images, encode_texts
from cliptune.models.base import ClipModel


def zeroshot_classifier(
    model: ClipModel, classnames: list[str], templates: list[str], precision: str = "fp32"
) -> torch.Tensor:
    """(D, C) weights: per class, the re-normalised mean of its normalised template embeddings."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, prompts, precision=precision).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1).T


def evaluate_zeroshot(
    model: ClipModel,
    data: LabelledImages,
    templates: list[str],
    batch_size: int = 64,
    precision: str = "fp32",
    workers: int = 0,
) -> dict[str, float]:
    """acc1, acc5 (when there are at least 5 classes) and mean per-class recall, in percent."""
    weights = zeroshot_classifier(model, data.classnames, templates, precision)
    image_emb = encode_images(model, data.paths, batch_size, precision, workers)
    return metrics.classification(100.0 * image_emb @ weights, torch.tensor(data.labels))
