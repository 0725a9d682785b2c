"""Model backends behind one interface: a name -> builder table, and saving/loading any built model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cliptune.models import openclip
from cliptune.models.base import ClipModel, Tower
from cliptune.models.errors import ModelError
from cliptune.models.io import load_model, save_model

# backend name -> builder(arch, pretrained, **spec). A new backend adds one line here and one module beside it.
BACKENDS: dict[str, Callable[..., ClipModel]] = {
    "openclip": openclip.build,
}


def build_model(backend: str, arch: str, pretrained: str | None = None, **spec: Any) -> ClipModel:
    if backend not in BACKENDS:
        raise ModelError(f"model.backend: {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](arch, pretrained, **spec)


def rebuild(spec: dict[str, Any]) -> ClipModel:
    """The architecture a saved `spec()` describes, without pretrained weights (they come from the saved file)."""
    spec = dict(spec)
    return build_model(spec.pop("backend"), spec.pop("arch"), None, **spec)


__all__ = ["BACKENDS", "ClipModel", "ModelError", "Tower", "build_model", "load_model", "rebuild", "save_model"]
