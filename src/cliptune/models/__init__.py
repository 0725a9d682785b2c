"""Model backends behind one interface: a name -> backend table, and saving/loading any built model."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from cliptune.config import ModelConfig
from cliptune.models.base import ClipModel, Tower
from cliptune.models.errors import ModelError
from cliptune.models.io import load_model, save_model


class Backend(NamedTuple):
    build: Callable[[ModelConfig], ClipModel]  # from the config, with pretrained weights
    rebuild: Callable[[dict[str, Any], Path | None], ClipModel]  # from a saved spec() and assets folder, no download


def _lazy(module: str) -> Backend:
    # open_clip, transformers and the tower libraries are slow to import (seconds each): load a backend's module only
    # when it is used.
    def load() -> Any:
        return importlib.import_module(f"cliptune.models.{module}")

    return Backend(lambda cfg: load().build(cfg), lambda spec, folder: load().rebuild(spec, folder))


# backend name (`model.backend`) -> its builders. A new backend adds one line here and one module beside it.
BACKENDS: dict[str, Backend] = {
    "openclip": _lazy("openclip"),
    "hf": _lazy("hf"),
    "composed": _lazy("composed"),
}


class Wrapper(NamedTuple):
    """A model that wraps a built one (`cliptune.models.wrapper.WrappedModel`): not built from a config."""

    rebuild: Callable[[dict[str, Any], ClipModel], ClipModel]  # from its saved spec() around the rebuilt base
    how: str  # how a run adds it, for the error when someone names it as model.backend


def _lazy_wrapper(module: str, how: str) -> Wrapper:
    return Wrapper(lambda spec, base: importlib.import_module(f"cliptune.models.{module}").rebuild(spec, base), how)


# saved spec()["backend"] of a wrapper -> how to rebuild it around its base.
WRAPPERS: dict[str, Wrapper] = {
    "heads": _lazy_wrapper("heads", "set finetune.heads: linear or mlp to add heads on top of the model"),
    "prompted": _lazy_wrapper("prompted", "set finetune.prompt_tokens to the number of learnable prompt vectors"),
    "classifier": _lazy_wrapper(
        "classifier", "set loss.name: ce with data.labelled, or use cliptune.features.prompts.zeroshot_head"
    ),
}


def build_model(cfg: ModelConfig) -> ClipModel:
    if cfg.backend in WRAPPERS:
        raise ModelError(
            f"model.backend: {cfg.backend!r} is not a model family but a wrapper around a built model: choose the "
            f"base model's backend ({', '.join(BACKENDS)}) and {WRAPPERS[cfg.backend].how}"
        )
    if cfg.backend not in BACKENDS:
        raise ModelError(f"model.backend: {cfg.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[cfg.backend].build(cfg)


def rebuild(spec: dict[str, Any], folder: Path | None = None) -> ClipModel:
    """The architecture a saved `spec()` describes, without pretrained weights (they come from the saved file)."""
    name = spec.get("backend")
    if name in WRAPPERS:
        return WRAPPERS[name].rebuild(spec, rebuild(spec["base"], folder))
    if name not in BACKENDS:
        raise ModelError(f"model.json: backend {name!r} is unknown; known: {', '.join([*BACKENDS, *WRAPPERS])}")
    return BACKENDS[name].rebuild(spec, folder)


__all__ = [
    "BACKENDS",
    "WRAPPERS",
    "ClipModel",
    "ModelError",
    "Tower",
    "build_model",
    "load_model",
    "rebuild",
    "save_model",
]
