"""Epoch checkpoints written atomically: weights as safetensors, optimizer/scheduler/RNG/data-order state beside."""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cliptune.models.io import state_for_saving
from cliptune.utils.files import atomic_dir, atomic_write

LATEST = "latest"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


@dataclass
class TrainState:
    """Where training stands: the next epoch to run and the optimizer steps done so far."""

    epoch: int = 0
    step: int = 0


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path, model: torch.nn.Module, trainer_state: dict[str, Any], state: TrainState, keep: int
) -> Path:
    """Write `folder/epoch_{state.epoch}` in one rename, point `latest` at it and prune the oldest."""
    target = folder / f"epoch_{state.epoch}"
    with atomic_dir(target) as tmp:
        save_file(state_for_saving(model), str(tmp / "model.safetensors"))
        payload = {"epoch": state.epoch, "step": state.step, "rng": rng_state(), **trainer_state}
        torch.save(payload, tmp / "state.pt")
    with atomic_write(folder / LATEST) as tmp:
        tmp.write_text(target.name)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("epoch_*") if p.is_dir() and _EPOCH_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_EPOCH_DIR.match(p.name).group(1)))


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / LATEST
    if pointer.is_file() and (folder / pointer.read_text().strip()).is_dir():
        return folder / pointer.read_text().strip()
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[TrainState, dict[str, Any]]:
    """Restore weights and RNG; return the train state and the rest (optimizer, scheduler, ...) for the caller."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    # weights_only=False: the payload holds Python and numpy RNG states, which we wrote ourselves.
    payload = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    set_rng_state(payload.pop("rng"))
    state = TrainState(epoch=payload.pop("epoch"), step=payload.pop("step"))
    return state, payload
