"""Using a model: load a fine-tuned run or a model spec, and encode images and texts to numpy embeddings.

Inference never imports training code, so serving a model stays light.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cliptune.config import ModelConfig
from cliptune.config import build as build_config
from cliptune.eval.encode import encode_images, encode_texts
from cliptune.models import ClipModel, ModelError, build_model, load_model, rebuild
from cliptune.models.presets import PRESETS

ImageInput = str | Path | Image.Image


class Encoder:
    """A model ready for use: `encode_images` and `encode_texts` return L2-normalised float32 numpy arrays."""

    def __init__(self, model: ClipModel, device: str = "auto", precision: str = "fp32") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device).eval()
        self.precision = precision

    def encode_images(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 64) -> np.ndarray:
        items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        return encode_images(self.model, items, batch_size, self.precision).numpy()

    def encode_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        items = [texts] if isinstance(texts, str) else list(texts)
        return encode_texts(self.model, items, batch_size, self.precision).numpy()


def _from_run_dir(folder: Path) -> ClipModel:
    if (folder / "model.json").is_file():
        return load_model(folder)
    if (folder / "model" / "model.json").is_file():
        return load_model(folder / "model")
    from cliptune.export import read_export  # exported open_clip / hf folders load back

    exported = read_export(folder)
    if exported is not None:
        return exported
    from safetensors.torch import load_file

    # An interrupted run has no final model yet: fall back to its newest epoch checkpoint.
    latest = folder / "checkpoints" / "latest"
    assets = folder / "model_assets"
    if latest.is_file() and (assets / "model.json").is_file():
        model = rebuild(json.loads((assets / "model.json").read_text()), assets)
        model.load_state_dict(load_file(str(folder / "checkpoints" / latest.read_text().strip() / "model.safetensors")))
        return model.eval()
    raise ModelError(
        f"{folder} is not a run directory, saved model or exported open_clip / hf folder (no model/model.json, "
        "no checkpoint, no open_clip_config.json or config.json)"
    )


def parse_model_spec(spec: str | dict[str, Any]) -> ModelConfig:
    """A preset name, `arch`, `arch:tag`, `arch:/path/to/checkpoint`, or a dict like the config's `model` section."""
    if isinstance(spec, dict):
        return build_config({"model": spec}).model
    if spec in PRESETS:
        return build_config({"model": {"preset": spec}}).model
    arch, _, pretrained = spec.partition(":")
    return build_config({"model": {"arch": arch, "pretrained": pretrained or None}}).model


def load_any(spec: str | Path | dict[str, Any] | ClipModel) -> ClipModel:
    if isinstance(spec, ClipModel):
        return spec
    if isinstance(spec, (str, Path)) and Path(spec).expanduser().is_dir():
        return _from_run_dir(Path(spec).expanduser())
    return build_model(parse_model_spec(spec if isinstance(spec, dict) else str(spec))).eval()


def load(spec: str | Path | dict[str, Any], device: str = "auto", precision: str = "fp32") -> Encoder:
    """A run directory, a saved model folder, or a model spec (`ViT-B-32:openai`) as a ready Encoder."""
    return Encoder(load_any(spec), device=device, precision=precision)
