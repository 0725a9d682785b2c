"""FT-CLIP's objective (`loss.name: ce`): cross-entropy through a zero-shot-initialised class head.

The head is `cliptune.models.classifier.ClassifierModel` on the run's model; `with_class_head` adds it before
training (the objective table's `prepare` step), built from the labelled set's class names and prompt templates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cliptune.config import ConfigError
from cliptune.losses.reduce import global_mean
from cliptune.models.base import ClipModel

if TYPE_CHECKING:
    from cliptune.config import LossConfig, RunConfig

# FT-CLIP / zero-shot logits use CLIP's fixed scale, so that step 0 reproduces zero-shot predictions and logits.
CLASSIFIER_SCALE = 100.0


def classification_loss(
    cfg: LossConfig,
    model: ClipModel,
    image: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy of `CLASSIFIER_SCALE * image @ class_weights.T`, averaged over every process.

    `targets` ([B, C] class shares, from data.mixup) replace the labels; timm's mixup targets are already smoothed.
    """
    weights = getattr(model, "class_weights", None)
    if weights is None:
        raise ConfigError("loss.name ce: the model has no class head; train it on data.labelled")
    logits = CLASSIFIER_SCALE * image @ weights.float().T
    if targets is not None:
        per_sample = F.cross_entropy(logits, targets.float(), reduction="none")
    else:
        per_sample = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing, reduction="none")
    return global_mean(per_sample.sum(), len(per_sample))


def with_class_head(cfg: RunConfig, model: ClipModel) -> ClipModel:
    """FT-CLIP: the image tower under a linear head holding the zero-shot weights of the class prompts."""
    from cliptune.data import read_classification
    from cliptune.features.prompts import zeroshot_head  # the evaluation's own zero-shot classifier, bit for bit

    if cfg.data.labelled is None:
        raise ConfigError("loss.name ce: classification fine-tuning needs data.labelled (a labelled image set)")
    labelled = read_classification(cfg.data.labelled, check_images=False)
    return zeroshot_head(model, labelled.classnames, cfg.data.labelled.templates, batch_size=cfg.eval.batch_size)
