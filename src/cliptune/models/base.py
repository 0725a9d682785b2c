"""The one model interface that training, tuning and evaluation use, whatever backend built the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Tower = Literal["image", "text", "shared"]


class ClipModel(nn.Module):
    """A dual encoder: image and text towers into one embedding space, plus a learnable temperature.

    A backend subclasses this and fills in the towers; everything else in cliptune talks only to these members:
    `encode_image`, `encode_text`, `logit_scale` (log of the inverse temperature), `tokenize`,
    `train_transform` / `eval_transform` (PIL image -> tensor), `tower_of` (which tower a parameter belongs
    to) and `spec` (JSON data that rebuilds the architecture without downloading anything).
    """

    backend: str = ""
    train_transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> nn.Parameter:
        raise NotImplementedError

    def tower_of(self, param_name: str) -> Tower:
        raise NotImplementedError

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        """Sub-modules that make up a tower, so a locked tower can be put in eval mode as a whole."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_assets(self, folder: Path) -> None:
        """Write what rebuilding needs besides `spec()` and the weights (tokenizer files, tower configs)."""

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)

    def tower_parameters(self, tower: Tower) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if self.tower_of(n) == tower}


class TrunkHeadModel(ClipModel):
    """A model whose towers split into a trunk and a projection head.

    The split lets a locked trunk's outputs be computed once and reused (`cliptune.eval.encode.Encoding`) while the
    heads train.
    """

    def image_trunk(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_head(self.image_trunk(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_head(self.text_trunk(tokens))
        return F.normalize(x, dim=-1) if normalize else x
