"""The `cliptune` export format: the model as `cliptune.load` reads it (model.json, model.safetensors, assets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cliptune.models import ClipModel, save_model


def write(model: ClipModel, folder: Path, **_: Any) -> dict[str, Any]:
    save_model(model, folder)
    return {}
