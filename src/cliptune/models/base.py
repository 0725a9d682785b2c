"""The one model interface that training, tuning and evaluation use, whatever backend built the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Tower = Literal["image", "text", "shared"]

# Who answers `encode_image_tokens` / `encode_text_tokens`: named in the error every other model raises.
DENSE_TOKEN_SUPPORT = "the openclip backend with a ViT image tower and the hf backend with a CLIP model"


def dense_tokens_unsupported(backend: str, why: str) -> NotImplementedError:
    """The error for a model that cannot return dense token features, saying what needs them and the way out."""
    return NotImplementedError(
        f"dense token features are not available from the {backend!r} backend: {why}. Only {DENSE_TOKEN_SUPPORT} "
        "(not wrapped with projection heads or prompt tuning) return them. loss.name 'fsc' needs them for its local "
        "hard-negative loss: use such a model, or set the local hard-negative loss weight (loss.local_weight) to 0."
    )


class ClipModel(nn.Module):
    """A dual encoder: image and text towers into one embedding space, plus a learnable temperature.

    A backend subclasses this and fills in the towers; everything else in cliptune talks only to these members:
    `encode_image`, `encode_text`, `logit_scale` (log of the inverse temperature), `tokenize`,
    `train_transform` / `eval_transform` (PIL image -> tensor), `tower_of` (which tower a parameter belongs
    to) and `spec` (JSON data that rebuilds the architecture without downloading anything).

    `encode_image_tokens` / `encode_text_tokens` (dense features for token-level losses such as FSC-CLIP's local
    hard-negative loss) are optional: a backend that cannot give them keeps the default, which raises.
    """

    backend: str = ""
    train_transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, patches) from one forward pass, so a loss on both back-propagates through both.

        pooled: [B, D], L2-normalised, exactly what `encode_image` returns. patches: [B, P, D], one per image
        patch (class token excluded) after the tower's final norm and projection, not normalised.
        """
        raise dense_tokens_unsupported(self.backend, f"{type(self).__name__} does not implement encode_image_tokens")

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled, features, mask) from one forward pass.

        pooled: [B, D], L2-normalised, exactly what `encode_text` returns. features: [B, L, D], every position's
        final-norm output through the text projection, not normalised; L may be shorter than `tokens` (a causal
        tower stops at the batch's last end token). mask: [B, L] bool, True on a caption's content tokens *and*
        its end token (FSC-CLIP: "non-pad tokens, start token excluded"), False on the start token, padding and
        everything after the end token.
        """
        raise dense_tokens_unsupported(self.backend, f"{type(self).__name__} does not implement encode_text_tokens")

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

    def set_grad_checkpointing(self, enable: bool = True) -> int:
        """Turn on each tower library's own activation checkpointing; returns how many modules took it.

        open_clip and timm models have `set_grad_checkpointing`, Hugging Face models `gradient_checkpointing_enable`;
        every such sub-module is switched (nested ones too: the switch is idempotent). transformers is asked for the
        non-reentrant variant, which also back-propagates through blocks whose inputs need no gradient (a model
        whose embeddings are locked).
        """
        switched = 0
        for module in self.modules():
            if module is self or isinstance(module, ClipModel):
                continue
            if callable(getattr(module, "set_grad_checkpointing", None)):
                module.set_grad_checkpointing(enable)
                switched += 1
            elif getattr(module, "supports_gradient_checkpointing", False) and hasattr(
                module, "is_gradient_checkpointing"
            ):
                if enable:
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                else:
                    module.gradient_checkpointing_disable()
                switched += 1
        if not switched and enable:
            raise ValueError(
                f"train.grad_checkpointing: no tower of this {self.backend or type(self).__name__} model supports "
                "activation checkpointing (open_clip, timm and Hugging Face towers do); set it to false"
            )
        return switched


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
