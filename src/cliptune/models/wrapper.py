"""The base class of models that wrap another `ClipModel` (`self.base`): heads, prompts, a class head.

A wrapper delegates the whole interface to its base and overrides only what it changes. Its parameters are named
`base.<the base's name>` plus its own; `tower_of` asks `own_tower` about its own ones first. The saved spec nests
the base's (`{"backend": <wrapper>, ...wrapper_spec(), "base": base.spec()}`), so `cliptune.models.rebuild`
rebuilds the base with its own backend and wraps it again through the `WRAPPERS` table.

What a wrapper does *not* inherit, because wrapping changes it: `text_path` (prompts go into a bare model) and the
dense token features (`encode_image_tokens` / `encode_text_tokens`: projection heads or prompts change what the
tokens would be); a wrapper that leaves the towers as they are (the class head) delegates those itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cliptune.models.base import ClipModel, Tower
from cliptune.models.layers import Found

BASE = "base."  # the name prefix of the wrapped model's parameters


class WrappedModel(ClipModel):
    """A `ClipModel` around `base`, delegating every member it does not override."""

    containers = ("base",)

    def __init__(self, base: ClipModel) -> None:
        super().__init__()
        self.base = base
        self.train_transform, self.eval_transform = base.train_transform, base.eval_transform

    def own_tower(self, param_name: str) -> Tower | None:
        """The tower of one of the wrapper's own parameters (not under `base.`); None for the base's."""
        return None

    def wrapper_spec(self) -> dict[str, Any]:
        """What rebuilding the wrapper needs besides the base's spec."""
        return {}

    # --- the ClipModel interface, delegated

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.base.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.base.encode_text(tokens, normalize=normalize)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.base.tokenize(texts)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.base.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return self.base.logit_bias

    def tower_of(self, param_name: str) -> Tower:
        own = self.own_tower(param_name)
        if own is not None:
            return own
        return self.base.tower_of(param_name.removeprefix(BASE))

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        return self.base.tower_modules(tower)

    def spec(self) -> dict[str, Any]:
        return {"backend": self.backend, **self.wrapper_spec(), "base": self.base.spec()}

    def save_assets(self, folder: Path) -> None:
        self.base.save_assets(folder)  # a wrapper's own weights are in the state dict, its layout in spec()

    # --- the hooks, delegated

    def recognise_layers(self, module: nn.Module, tower: Tower) -> Found | None:
        return self.base.recognise_layers(module, tower)

    def weight_readers(self) -> tuple[type[nn.Module], ...]:
        return self.base.weight_readers()

    def lora_targets(self) -> tuple[str, ...]:
        return self.base.lora_targets()

    def has_trunk(self, tower: Tower) -> bool:
        return self.base.has_trunk(tower)

    def trunk(self, tower: Tower, inputs: torch.Tensor) -> torch.Tensor:
        return self.base.trunk(tower, inputs)

    def head(self, tower: Tower, features: torch.Tensor) -> torch.Tensor:
        return self.base.head(tower, features)

    def set_drop_path(self, rate: float) -> int:
        return self.base.set_drop_path(rate)

    def set_image_size(self, size: int) -> None:
        self.base.set_image_size(size)
        self.train_transform, self.eval_transform = self.base.train_transform, self.base.eval_transform

    # --- export (`cliptune.export`): what describes the text input is the base's; formats and `to_*` are not
    # delegated, since a wrapper's own parameters must go somewhere (each wrapper says where, or refuses)

    def hf_tokenizer(self) -> Any:
        return self.base.hf_tokenizer()

    @property
    def text_attention_mask(self) -> bool:  # type: ignore[override]
        return self.base.text_attention_mask

    def encode_text_with_mask(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        return self.base.encode_text_with_mask(tokens, attention_mask, normalize=normalize)

    def text_length_free(self) -> bool:
        return self.base.text_length_free()

    def image_trunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk("image", images)

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head("image", features)

    def text_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk("text", tokens)

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head("text", features)
