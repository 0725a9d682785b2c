"""A classifier for classification fine-tuning: any model's image tower plus a linear head over class embeddings.

`ClassifierModel` wraps a built `ClipModel` (`self.base`) and adds one parameter, `class_weights` (C, D): row c is
class c's embedding. `cliptune.features.prompts.zeroshot_head` fills it with the zero-shot classifier of the class
names and prompt templates (the one zero-shot evaluation scores with; models/ depends on neither), so before any
training `classify` returns exactly the logits the zero-shot evaluation scores, `100 * image @ W`, and epoch 0
equals zero-shot accuracy.

Where this comes from, and the one choice made here:

- WiSE-FT (and FLYP's and LP-FT's baselines) initialise the head from the zero-shot weights and train it with the
  image tower on normalised image features. WiSE-FT bakes the model's temperature into the weights
  (`weights = exp(logit_scale) * W`, 100 for OpenAI's CLIP) and adds a zero bias.
- FT-CLIP (seed 002) does not start from zero-shot at all: its head is new and random (`trunc_normal(0.02) * 1e-3`)
  on mean-pooled patch tokens.
- Here the rows stay unit vectors at initialisation and the scale is a fixed `ZEROSHOT_SCALE = 100`, the constant
  of the zero-shot evaluation (CLIP_benchmark), whatever the model's own `logit_scale`: the logits then match the
  evaluation bit for bit on any model, and AdamW moves the head at the same relative rate as the tower (a head
  scaled to norm 100 would barely move at the tower's learning rate). No bias: zero-shot has none.

The head belongs to the image tower (`tower_of("class_weights") == "image"`): locking the image tower locks it
too (`lock_image_patterns: "!class_weights"` trains a linear probe), and layer-wise lr decay counts it as "after
the last block" (lr scale 1). The text tower stays usable as it was, so zero-shot on other datasets measures what
the fine-tuning forgot.

Saved as `{"backend": "classifier", "classes": [...], "dim": D, "base": base.spec()}`; the weights are in the state
dict.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.models.base import ClipModel, Tower
from cliptune.models.errors import ModelError
from cliptune.models.wrapper import WrappedModel

HEAD = "class_weights"
# The fixed logit scale of zero-shot evaluation (`cliptune.eval.zeroshot.evaluate_zeroshot`).
ZEROSHOT_SCALE = 100.0


def _check_classes(class_names: list[str], weights: torch.Tensor) -> None:
    if not class_names:
        raise ModelError("a classifier needs at least one class name")
    duplicates = sorted(n for n, count in Counter(class_names).items() if count > 1)
    if duplicates:
        raise ModelError(f"class names must be distinct; repeated: {', '.join(map(repr, duplicates))}")
    if weights.ndim != 2 or weights.shape[0] != len(class_names):
        raise ModelError(
            f"class weights must have shape (classes, embedding size) = ({len(class_names)}, D), "
            f"got {tuple(weights.shape)}"
        )


class ClassifierModel(WrappedModel):
    """A `ClipModel` whose `classify(images)` scores images against one learnable embedding per class."""

    backend = "classifier"

    def __init__(self, base: ClipModel, class_names: list[str], weights: torch.Tensor) -> None:
        class_names = list(class_names)
        _check_classes(class_names, weights)
        super().__init__(base)
        self.class_names = class_names
        reference = next(base.parameters())
        rows = weights.detach().to(device=reference.device, dtype=reference.dtype)
        self.class_weights = nn.Parameter(rows.clone(memory_format=torch.contiguous_format))  # row-major (C, D)
        self.train(base.training)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C): 100 * normalised image embedding @ class_weights.T."""
        # Re-normalised in float32, as the zero-shot evaluation does: a bf16 unit vector is only unit to about 1e-2.
        features = F.normalize(self.base.encode_image(images, normalize=True).float(), dim=-1)
        if features.shape[-1] != self.class_weights.shape[1]:
            raise ModelError(
                f"image embeddings have size {features.shape[-1]} but the class weights {self.class_weights.shape[1]}"
                ": the head was built for another model"
            )
        return ZEROSHOT_SCALE * features @ self.class_weights.T.to(features.dtype)

    # --- what the head changes in the ClipModel interface; the towers are the base's, unchanged

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.encode_image_tokens(images)

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.base.encode_text_tokens(tokens)

    def check_dense_tokens(self) -> None:
        self.base.check_dense_tokens()

    def own_tower(self, param_name: str) -> Tower | None:
        # The head is a bare parameter, not a module: it has no train/eval mode, so tower_modules stays the base's.
        return "image" if param_name == HEAD else None

    def wrapper_spec(self) -> dict[str, Any]:
        return {"classes": list(self.class_names), "dim": int(self.class_weights.shape[1])}

    # --- export: open_clip and transformers CLIP models have no place for a class head; ONNX adds `logits`

    def _head_refusal(self, fmt: str) -> Exception:
        why = f"its classification head ({len(self.class_names)} classes) has no place in a {fmt} model"
        return self.cannot_export(fmt, why)

    def to_open_clip(self) -> Any:
        raise self._head_refusal("open_clip")

    def to_hf(self) -> Any:
        raise self._head_refusal("hf")


def rebuild(spec: dict[str, Any], base: ClipModel) -> ClassifierModel:
    """The saved base (rebuilt offline by its own backend) with a placeholder head; the saved weights load after."""
    classes = spec["classes"]
    return ClassifierModel(base, classes, torch.zeros(len(classes), int(spec["dim"])))
