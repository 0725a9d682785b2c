"""A run's epoch checkpoint folders: their names, finding the newest, and reading the model weights in one. It is the
part of the checkpoint format that loading a model needs (`cliptune.load` of an interrupted run reads its newest
checkpoint's weights).

It sits below inference and training alike, so that loading a model never imports training code;
`train/checkpoint.py` writes the checkpoints and reads the training state beside the weights.
Reading never follows `latest` or a link out of the run's `checkpoints/` folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cliptune.models.errors import ModelError
from cliptune.models.io import load_weights_file
from cliptune.utils.paths import inside

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, foreign, from an older format, or pointing outside its run."""


def checkpoint_folder(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def epoch_folder(epoch: int, step: int, mid_epoch: bool) -> str:
    """`epoch_N` after N whole epochs; `epoch_E_step_S` for a mid-epoch checkpoint (E whole epochs, S steps done)."""
    return f"epoch_{epoch}_step_{step}" if mid_epoch else f"epoch_{epoch}"


def list_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("epoch_*") if _EPOCH_DIR.match(p.name) and p.is_dir()]
    for path in found:
        inside(folder, path.name, f"{folder}: checkpoint {path.name}")
    return sorted(found, key=_order)


def _order(path: Path) -> tuple[int, int]:
    """(whole epochs, step): `epoch_2` sorts before `epoch_2_step_150`, which is in the third epoch."""
    epoch, step = _EPOCH_DIR.match(path.name).groups()
    return int(epoch), int(step or 0)


def latest_checkpoint(folder: Path) -> Path | None:
    """The folder `latest` names (it must be an `epoch_N` inside `folder`), else the newest one found."""
    pointer = folder / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not _EPOCH_DIR.match(name):
            raise CheckpointError(f"{pointer}: names {name!r}, not an epoch_N folder; delete it to use the newest")
        if inside(folder, name, str(pointer)).is_dir():
            return folder / name
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load `path/model.safetensors` into `model`; a missing, damaged or foreign file is a CheckpointError."""
    weights = inside(path, WEIGHTS, f"{path}: weights")
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS} is missing; this is not a complete cliptune checkpoint")
    try:
        load_weights_file(weights, model, "the run's model_assets/model.json")
    except ModelError as e:
        raise CheckpointError(f"{e}; resume with the run's own config.yaml, or start a new `name`") from None
