"""Class embeddings from prompt templates: the zero-shot classifier, and a class head initialised with it.

Zero-shot evaluation scores images against these weights (`cliptune.eval.zeroshot`), and classification
fine-tuning (`loss.name: ce`) starts its head from them, so that step 0 reproduces zero-shot predictions exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptune.features.encoding import Encoding
from cliptune.models.base import ClipModel
from cliptune.models.classifier import ClassifierModel
from cliptune.models.errors import ModelError


def zeroshot_classifier(
    encoding: Encoding, classnames: list[str], templates: list[str], where: str | None = None
) -> torch.Tensor:
    """(D, C) weights: per class, the re-normalised mean of its normalised template embeddings; prompts longer
    than the text context are counted and named after `where` (a set's name) if given."""
    prompts = [t.format(c) for c in classnames for t in templates]
    if where is not None:
        encoding.report_overflow(prompts, where)
    emb = encoding.texts(prompts).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1).T


def zeroshot_head(
    base: ClipModel, class_names: list[str], templates: list[str], batch_size: int = 64, precision: str = "fp32"
) -> ClassifierModel:
    """`base` under the class head that reproduces zero-shot classification with these names and templates."""
    if not templates or any("{}" not in t for t in templates):
        raise ModelError(f"templates {templates!r}: give at least one, each with one '{{}}' for the class name")
    weights = zeroshot_classifier(Encoding(base, precision, batch_size), list(class_names), list(templates))
    return ClassifierModel(base, class_names, weights.T)  # (D, C) -> (C, D): a row per class
