"""Zero-shot classification: a classifier built from prompt templates (`cliptune.features.prompts`), scored on
labelled images."""

from __future__ import annotations

import torch

from cliptune import metrics
from cliptune.data import LabelledImages
from cliptune.features.encoding import Encoding
from cliptune.features.prompts import zeroshot_classifier


def class_weights(encoding: Encoding, data: LabelledImages, templates: list[str]) -> torch.Tensor:
    """(D, C): a classification-fine-tuned model's own head for its classes, else the zero-shot classifier."""
    model = encoding.model
    head = getattr(model, "class_weights", None)
    if head is not None and list(getattr(model, "class_names", [])) == list(data.classnames):
        return head.detach().float().T.cpu()  # encodings are CPU tensors
    return zeroshot_classifier(encoding, data.classnames, templates, f"prompts of zero-shot set {data.name!r}")


def evaluate_zeroshot(encoding: Encoding, data: LabelledImages, templates: list[str]) -> dict[str, float]:
    """acc1, acc5 (when there are at least 5 classes) and mean per-class recall, in percent.

    A model with a trained class head (loss.name ce) is scored through that head on a set with its classes; any
    other set (or model) through prompts, which is what measures how much the text-image alignment was kept.
    """
    weights = class_weights(encoding, data, templates)
    logits = 100.0 * encoding.images(data.paths) @ weights
    return metrics.classification(logits, torch.tensor(data.labels))
