"""Model backends behind one interface: a name -> backend table, and saving/loading any built model."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from cliptune.config import ModelConfig
from cliptune.models import openclip
from cliptune.models.base import ClipModel, Tower
from cliptune.models.errors import ModelError
from cliptune.models.io import load_model, save_model


class Backend(NamedTuple):
    build: Callable[[ModelConfig], ClipModel]  # from the config, with pretrained weights
    rebuild: Callable[[dict[str, Any], Path | None], ClipModel]  # from a saved spec() and assets folder, no download


def _lazy(module: str) -> Backend:
    # transformers and the tower libraries are slow to import: load a backend's module only when it is used.
    def load() -> Any:
        return importlib.import_module(f"cliptune.models.{module}")

    return Backend(lambda cfg: load().build(cfg), lambda spec, folder: load().rebuild(spec, folder))


# backend name -> its builders. A new backend adds one line here and one module beside it.
BACKENDS: dict[str, Backend] = {
    "openclip": Backend(openclip.build, openclip.rebuild),
    "hf": _lazy("hf"),
    "composed": _lazy("composed"),
    "heads": _lazy("heads"),
    "prompted": _lazy("prompted"),
    "classifier": _lazy("classifier"),
}


def build_model(cfg: ModelConfig) -> ClipModel:
    if cfg.backend not in BACKENDS:
        raise ModelError(f"model.backend: {cfg.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[cfg.backend].build(cfg)


def rebuild(spec: dict[str, Any], folder: Path | None = None) -> ClipModel:
    """The architecture a saved `spec()` describes, without pretrained weights (they come from the saved file)."""
    return BACKENDS[spec["backend"]].rebuild(spec, folder)


__all__ = ["BACKENDS", "ClipModel", "ModelError", "Tower", "build_model", "load_model", "rebuild", "save_model"]
