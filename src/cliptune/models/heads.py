"""New projection heads on top of any model's normalised embeddings (`finetune.heads: linear | mlp`).

Seed 000's "lock CLIP and add linear/MLP heads": `HeadedModel` wraps a built `ClipModel` (`self.base`) and maps each
tower's normalised embedding (size D) through a new D -> D head. Both heads start as the identity (linear: identity
matrix; mlp: `x + MLP(x)` with the last layer zero), so before training the wrapped model embeds exactly as the base
does and epoch 0 equals zero-shot. The base's whole encoder is the "trunk" (`image_trunk` / `text_trunk`), the new
head is the head: with both towers locked only the heads and the temperature train, and `Encoding` caches the trunks.

Saved as `{"backend": "heads", "heads": kind, "base": base.spec()}` with the base's assets beside it, so
`cliptune.models.load_model` rebuilds the base with its own backend and wraps it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cliptune.models.base import ENCODERS, ClipModel, HFExport, OpenClipExport, Tower, TrunkHeadModel
from cliptune.models.errors import ModelError
from cliptune.models.wrapper import BASE, WrappedModel

_PROBE_SIDE = 224  # any size: the base's eval transform resizes the probe image to what its image tower takes


class ResidualMLP(nn.Module):
    """x + Linear(GELU(Linear(x))), the last layer zero-initialised so it starts as the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)  # fc1 keeps its default init: with fc2 at zero, the sum is x whatever fc1 is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


def _identity_linear(dim: int) -> nn.Module:
    head = nn.Linear(dim, dim, bias=False)  # no bias, as CLIP's projections: the output is normalised
    with torch.no_grad():
        head.weight.copy_(torch.eye(dim))
    return head


# finetune.heads -> a D -> D head that is the identity at initialisation. A new kind adds one line here.
HEADS: dict[str, Callable[[int], nn.Module]] = {"linear": _identity_linear, "mlp": ResidualMLP}


def check_kind(kind: str) -> None:
    if kind not in HEADS:
        raise ModelError(f"finetune.heads: {kind!r} is unknown; choose one of {', '.join(HEADS)} (or none)")


def make_head(kind: str, dim: int) -> nn.Module:
    """A D -> D head that is the identity at initialisation."""
    check_kind(kind)
    return HEADS[kind](dim)


class HeadedModel(TrunkHeadModel, WrappedModel):
    """Any `ClipModel` with a new head on each tower's normalised embedding."""

    backend = "heads"

    def __init__(self, base: ClipModel, kind: str) -> None:
        check_kind(kind)  # before the probe runs the base
        super().__init__(base)
        self.kind = kind
        dim, self._module_sides = _probe(base)
        self._param_sides = {
            f"{module}.{name}": side
            for module, side in self._module_sides.items()
            for name, _ in base.get_submodule(module).named_parameters()
        }
        reference = next(base.parameters())
        self.heads = nn.ModuleDict({t: make_head(kind, dim) for t in ENCODERS})
        self.heads.to(device=reference.device, dtype=reference.dtype)
        self.train(base.training)

    # --- trunk and head of each tower, public so a trainer can cache a locked trunk's outputs

    def image_trunk(self, images: torch.Tensor) -> torch.Tensor:
        """The base model's normalised image embedding [B, D]."""
        return self.base.encode_image(images, normalize=True)

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.heads["image"](features)

    def text_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """The base model's normalised text embedding [B, D]."""
        return self.base.encode_text(tokens, normalize=True)

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.heads["text"](features)

    # --- what the heads change in the ClipModel interface

    def own_tower(self, param_name: str) -> Tower | None:
        if not param_name.startswith(BASE):
            return "shared"  # the new heads
        return self._param_sides.get(param_name.removeprefix(BASE))

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        # A base "shared" module that only one side uses (a composed model's projection) is part of that trunk.
        moved = {name: self.base.get_submodule(name) for name in self._module_sides}
        if tower == "shared":
            kept = [m for m in self.base.tower_modules("shared") if all(m is not n for n in moved.values())]
            return [*kept, self.heads]
        return [*self.base.tower_modules(tower), *(m for n, m in moved.items() if self._module_sides[n] == tower)]

    def wrapper_spec(self) -> dict[str, Any]:
        return {"heads": self.kind}

    # --- export: a linear head folds into the base's output projection; an MLP head has nowhere to go

    def export_formats(self) -> tuple[str, ...]:
        if self.kind == "linear" and self.base.linear_head_folds():
            return self.base.export_formats()
        return ("cliptune", "onnx")

    @contextmanager
    def _folded(self, fmt: str) -> Iterator[ClipModel]:
        """The base with the linear heads folded into its projections (same embeddings), restored on exit.

        Folded in place and put back rather than deep-copied: a copy would duplicate the tokenizer's tables too
        (2 s for open_clip's BPE), and the exports copy the weights they keep anyway.
        """
        if self.kind != "linear":
            raise self.cannot_export(fmt, "an MLP head is not linear, so it cannot be folded into the projection")
        if not self.base.linear_head_folds():
            getattr(self.base, f"to_{fmt}")()  # the base's own reason, when it cannot be written as fmt at all
            raise self.cannot_export(fmt, f"the {self.base.backend!r} model has no linear projection to fold into")
        saved = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        try:
            for tower in ENCODERS:
                self.base.fold_linear_head(tower, self.heads[tower].weight.detach())
            yield self.base
        finally:
            self.base.load_state_dict(saved)

    def to_open_clip(self) -> OpenClipExport:
        with self._folded("open_clip") as base:
            return base.to_open_clip()

    def to_hf(self) -> HFExport:
        with self._folded("hf") as base:
            return base.to_hf()

    def encode_text_with_mask(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        x = self.text_head(self.base.encode_text_with_mask(tokens, attention_mask, normalize=True))
        return F.normalize(x, dim=-1) if normalize else x


def _probe(base: ClipModel) -> tuple[int, dict[str, Tower]]:
    """(embedding size D, name of each base "shared" module that one tower alone uses -> that tower).

    One dummy caption and image go through the base in eval mode without gradients. Hooks on the base's shared
    modules tell which side uses each: a composed model's projections are shared in the base, but here they sit
    inside a trunk, so they must be locked, cached and fingerprinted with that tower.
    """
    names = {id(m): n for n, m in base.named_modules()}
    shared = [m for m in base.tower_modules("shared") if id(m) in names]
    used: dict[str, set[Tower]] = {names[id(m)]: set() for m in shared}
    side: list[Tower] = ["image"]  # which encoder is running, read by the hooks
    hooks = [m.register_forward_hook(lambda mod, *_: used[names[id(mod)]].add(side[0])) for m in shared]
    was_training = base.training
    base.eval()
    device = next(base.parameters()).device
    try:
        with torch.no_grad():
            picture = base.eval_transform(Image.new("RGB", (_PROBE_SIDE, _PROBE_SIDE), (128, 128, 128)))
            image_dim = base.encode_image(picture.unsqueeze(0).to(device)).shape[-1]
            side[0] = "text"
            text_dim = base.encode_text(base.tokenize(["a photo"]).to(device)).shape[-1]
    finally:
        for hook in hooks:
            hook.remove()
        base.train(was_training)
    if image_dim != text_dim:
        raise ModelError(f"cannot add heads: image embeddings have size {image_dim}, text embeddings {text_dim}")
    return image_dim, {name: towers.pop() for name, towers in used.items() if len(towers) == 1}


def add_heads(model: ClipModel, kind: str) -> HeadedModel:
    """`model` with a new identity-initialised head (`linear` or `mlp`) on each tower's normalised embedding."""
    return HeadedModel(model, kind)


def rebuild(spec: dict[str, Any], base: ClipModel) -> HeadedModel:
    """The saved architecture around the rebuilt base (`cliptune.models.WRAPPERS`); the saved weights load after."""
    return HeadedModel(base, spec["heads"])
