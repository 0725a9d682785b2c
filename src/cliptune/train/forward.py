"""One training batch's forward pass, as the module that DistributedDataParallel wraps.

DDP synchronises gradients only for a backward pass that follows a call of its wrapper, so everything a step computes
with the towers goes through `TrainModule.forward`: the whole batch at once, or one tower's chunk at a time
(GradCache). The objective is a sub-module too, so parameters it owns (SigLIP's bias) are synchronised like the
model's.

Texts of a batch are its captions followed by their hard negatives (`Batch.texts`): one text-tower call encodes
both, chunked like any other text rows, and the objective splits them again.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.losses.objective import Extras, Objective
from cliptune.models.base import ENCODERS, ClipModel, Tower


@dataclass
class Batch:
    """A collated training batch on the device; optional fields follow the dataset's `fields`."""

    images: torch.Tensor
    tokens: torch.Tensor
    group: torch.Tensor | None = None
    negatives: torch.Tensor | None = None  # [B, N, L] tokens
    negative_mask: torch.Tensor | None = None  # [B, N]
    targets: torch.Tensor | None = None  # [B, C] soft class targets (mixup / cutmix); None: `group` holds labels

    @classmethod
    def from_columns(cls, fields: tuple[str, ...], columns: tuple[torch.Tensor, ...], device: torch.device) -> Batch:
        values = {name: column.to(device, non_blocking=True) for name, column in zip(fields, columns)}
        values["images"], values["tokens"] = values.pop("image"), values.pop("tokens")
        return cls(**values)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def texts(self) -> torch.Tensor:
        """The captions, then every caption's negatives ([B + B*N, L])."""
        if self.negatives is None:
            return self.tokens
        return torch.cat([self.tokens, self.negatives.flatten(0, 1)])

    @property
    def extras(self) -> Extras:
        return Extras(self.group, self.negative_mask, self.targets)


class TrainModule(nn.Module):
    """The model and the objective; `forward(kind, ...)` computes features of a batch or of one tower's chunk."""

    def __init__(self, model: ClipModel, objective: Objective, locked: list[Tower], cached: list[Tower]) -> None:
        super().__init__()
        self.model, self.objective = model, objective
        self.locked, self.cached = list(locked), list(cached)

    def forward(self, kind: str, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if kind in ENCODERS:
            return self.embed(kind, inputs[0])
        if kind == "pair":
            return self.embed("image", inputs[0]), self.embed("text", inputs[1])
        if kind == "dense":
            return self.dense(*inputs)
        raise ValueError(f"unknown forward kind {kind!r}")

    def embed(self, tower: Tower, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised features of one tower; a cached tower's inputs are its locked trunk's outputs."""
        if tower in self.cached:
            return F.normalize(self.model.head(tower, inputs).float(), dim=-1)
        encode = self.model.encode_image if tower == "image" else self.model.encode_text
        # A locked tower needs no graph: running it under no_grad saves its activations' memory.
        with torch.no_grad() if tower in self.locked else nullcontext():
            return encode(inputs).float()

    def dense(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pooled features plus patch and token features (FSC-CLIP's local loss), in `Dense` field order.

        A plain tuple, not the dataclass: DDP looks for the output's tensors to find the parameters that were used.
        """
        with torch.no_grad() if "image" in self.locked else nullcontext():
            image, patches = self.model.encode_image_tokens(images)
        with torch.no_grad() if "text" in self.locked else nullcontext():
            text, tokens, mask = self.model.encode_text_tokens(texts)
        return image.float(), patches.float(), text.float(), tokens.float(), mask


__all__ = ["Batch", "TrainModule"]
