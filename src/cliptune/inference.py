"""Using a model: load a fine-tuned run or a model spec, and encode images and texts to numpy embeddings.

Inference never imports training code, so serving a model stays light.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cliptune.config import ConfigError, ModelConfig
from cliptune.config import build as build_config
from cliptune.features.encoding import encode_images, encode_texts
from cliptune.models import ClipModel, ModelError, build_model, load_model
from cliptune.models.checkpoints import checkpoint_folder, latest_checkpoint, load_weights
from cliptune.models.io import SPEC_FILE, rebuild_from
from cliptune.models.presets import PRESETS
from cliptune.utils.files import close_folders
from cliptune.utils.paths import inside

ImageInput = str | Path | Image.Image


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a device this machine has; anything else is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not allowed; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is visible; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class Encoder:
    """A model ready for use: `encode_images` and `encode_texts` return L2-normalised float32 numpy arrays."""

    def __init__(self, model: ClipModel, device: str = "auto", precision: str = "fp32") -> None:
        self.model = model.to(resolve_device(device)).eval()
        self.precision = precision

    def encode_images(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 64) -> np.ndarray:
        items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        return encode_images(self.model, items, batch_size, self.precision).numpy()

    def encode_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        items = [texts] if isinstance(texts, str) else list(texts)
        return encode_texts(self.model, items, batch_size, self.precision).numpy()


def _from_run_dir(folder: Path) -> ClipModel:
    if (folder / SPEC_FILE).is_file():
        return load_model(folder)
    if (folder / "model" / SPEC_FILE).is_file():
        return load_model(inside(folder, "model", str(folder)))
    from cliptune.export import read_export  # exported open_clip / hf folders load back

    exported = read_export(folder)
    if exported is not None:
        return exported
    # An interrupted run has no final model yet: its newest epoch checkpoint's weights (models/checkpoints.py, the
    # part of the checkpoint format that loading needs, so inference imports no training code).
    assets = inside(folder, "model_assets", str(folder))
    checkpoints = checkpoint_folder(folder)
    latest = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
    if latest is not None and (assets / SPEC_FILE).is_file():
        model = rebuild_from(inside(assets, SPEC_FILE, str(assets)), assets)
        load_weights(latest, model)
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
    if isinstance(spec, Path) or (isinstance(spec, str) and _looks_like_path(spec)):
        raise ModelError(_missing_folder(str(spec)))
    try:
        return build_model(parse_model_spec(spec if isinstance(spec, dict) else str(spec))).eval()
    except ModelError as e:  # a bare name that is no model may be a folder name mistyped
        folders = close_folders(spec) if isinstance(spec, str) and ":" not in spec else []
        if not folders:
            raise
        raise ModelError(f"{e} Nor is it a folder here; folders with close names: {_names(folders)}") from None


def _looks_like_path(spec: str) -> bool:
    """A run or model folder's path, not a model name (`arch`, `arch:tag`, `hf-hub:org/name`, `local-dir:...`)."""
    return ":" not in spec and (any(sep in spec for sep in ("/", "\\")) or spec.startswith((".", "~")))


def _missing_folder(spec: str) -> str:
    """Say the folder does not exist, and what was probably meant: close folder names, then close model names."""
    import open_clip

    path, hints = Path(spec).expanduser(), []
    if folders := close_folders(path):
        hints.append(f"Folders with close names: {_names(folders)}")
    models = difflib.get_close_matches(path.name, [*PRESETS, *open_clip.list_models()], n=5, cutoff=0.6)
    if models:
        hints.append(f"Model names close to {path.name!r}: {', '.join(models)} (`cliptune models` lists them all)")
    expected = f"{spec}: no such folder; a run folder, a saved model folder, or a model name was expected"
    return ". ".join([expected, *hints])


def _names(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def load(spec: str | Path | dict[str, Any], device: str = "auto", precision: str = "fp32") -> Encoder:
    """A run directory, a saved model folder, or a model spec (`ViT-B-32:openai`) as a ready Encoder."""
    return Encoder(load_any(spec), device=device, precision=precision)
