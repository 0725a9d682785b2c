"""Saving a model as spec + safetensors weights, and loading it back offline with identical embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cliptune.models.base import ClipModel
from cliptune.models.errors import ModelError
from cliptune.utils.files import atomic_write

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"


def state_for_saving(model: ClipModel) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights); contiguous clones are always safe.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: ClipModel, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / WEIGHTS_FILE) as tmp:
        save_file(state_for_saving(model), str(tmp))
    model.save_assets(folder)
    with atomic_write(folder / SPEC_FILE) as tmp:
        tmp.write_text(json.dumps(model.spec(), indent=2))
    return folder


def load_model(folder: str | Path) -> ClipModel:
    from cliptune.models import rebuild  # the backend table imports this module

    folder = Path(folder)
    spec_path, weights_path = folder / SPEC_FILE, folder / WEIGHTS_FILE
    if not spec_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{folder} holds no saved model: expected {SPEC_FILE} and {WEIGHTS_FILE} there")
    model = rebuild(json.loads(spec_path.read_text()), folder)
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval()
