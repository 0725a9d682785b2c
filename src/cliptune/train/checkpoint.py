"""Epoch checkpoints: writing them, and reading back the training state, with no pickle anywhere. Their folder names,
finding the newest and reading its model weights are `models/checkpoints.py`'s, as loading a model needs them and
must not import training code.

A checkpoint is a folder `checkpoints/epoch_N/` written in one rename:
- `model.safetensors`: the model's weights;
- `state.safetensors`: every other tensor an exact resume needs (optimizer moments, EMA shadow, RNG states, ...);
- `state.json`: the rest (epoch, step, scheduler, hyper-parameters, Python/numpy RNG), tensors named by key.
A mid-epoch checkpoint (train.checkpoint_every_steps) is `checkpoints/epoch_E_step_S/` (E whole epochs, S steps done).
`checkpoints/latest` names the newest folder. `checkpoints/best/` holds the weights of the best evaluation
(train.select): only the tensors training changes, beside `best.json` (where it was, its results); pruning never
touches it. Reading never unpickles (safetensors and JSON cannot run code) and never
follows `latest` or a link out of the run's `checkpoints/` folder.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cliptune.models.checkpoints import (
    LATEST,
    WEIGHTS,
    CheckpointError,
    checkpoint_folder,
    epoch_folder,
    list_checkpoints,
    load_weights,
)
from cliptune.models.io import state_for_saving
from cliptune.utils.files import atomic_dir, atomic_write, tensor_bytes, writing

if TYPE_CHECKING:
    from cliptune.train.setup import Trainer

STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"
FORMAT = 2  # 1 was a pickled state.pt, refused on read
BEST = "best"
# JSON cannot say "tensor", "tuple" or "dict with int keys" (optimizer state is keyed by parameter index): tagged
# objects do. Nested state with tensors is what torch.save pickles; safetensors holds flat tensors only, so this small
# codec is what lets the two safe formats replace it.
_TENSOR, _TUPLE, _ITEMS, _ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


@dataclass
class TrainState:
    """Where training stands: whole epochs done, optimizer steps done, and loader batches done in the current epoch
    (0 at an epoch boundary; a mid-epoch resume skips that many batches of the epoch's seeded order)."""

    epoch: int = 0
    step: int = 0
    batch: int = 0


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Nested state <-> (JSON, flat tensors)


def _split(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """`value` as JSON-able data; its tensors move to `tensors` under their path, replaced by a tagged reference."""
    if isinstance(value, torch.Tensor):
        tensors[where] = value.detach().cpu().contiguous().clone()  # clones: safetensors refuses shared storage
        return {_TENSOR: where}
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [_split(v, tensors, f"{where}.{i}") for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
        if plain:
            return {k: _split(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {_ITEMS: [[_split(k, tensors, where), _split(v, tensors, f"{where}.{k}")] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state {where}: {type(value).__name__} cannot be stored (tensors and plain data only)")


def _join(node: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    """Inverse of `_split`: tagged references back to tensors, tuples, arrays and non-string keys."""
    if isinstance(node, list):
        return [_join(v, tensors, source) for v in node]
    if not isinstance(node, dict):
        return node
    if _TENSOR in node:
        if node[_TENSOR] not in tensors:
            raise CheckpointError(f"{source}: tensor {node[_TENSOR]!r} is missing from {STATE_TENSORS}")
        return tensors[node[_TENSOR]]
    if _TUPLE in node:
        return tuple(_join(v, tensors, source) for v in node[_TUPLE])
    if _ARRAY in node:
        return np.asarray(node[_ARRAY], dtype=np.dtype(node["dtype"]))
    if _ITEMS in node:
        return {_join(k, tensors, source): _join(v, tensors, source) for k, v in node[_ITEMS]}
    return {k: _join(v, tensors, source) for k, v in node.items()}


def write_state(folder: Path, payload: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    data = {"format": FORMAT, **_split(payload, tensors, "state")}
    with writing(folder / STATE_TENSORS, tensor_bytes(tensors)):
        save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(data))


def read_state(folder: Path) -> dict[str, Any]:
    """The payload `write_state` wrote; a checkpoint from the pickle era or a damaged one is a CheckpointError."""
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    if not json_path.is_file() and (folder / "state.pt").exists():
        raise CheckpointError(
            f"{folder}: this checkpoint keeps its state in state.pt, a pickle written by an older cliptune; pickles "
            "can run code, so cliptune no longer reads them. Start the run again under a new `name` (its exported "
            "model/ folder, if any, still loads)"
        )
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise CheckpointError(f"{folder}: {path.name} is missing; this is not a complete cliptune checkpoint")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(
            f"{json_path}: checkpoint format {found!r}, expected {FORMAT}; not a checkpoint this cliptune wrote"
        )
    payload = _join({k: v for k, v in data.items() if k != "format"}, _read_tensors(tensor_path), json_path)
    missing = [k for k in ("epoch", "step", "rng") if k not in payload]
    if missing:
        raise CheckpointError(f"{json_path}: missing {', '.join(missing)}; the checkpoint is damaged")
    return payload


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated or foreign") from None


# ---------------------------------------------------------------------------------------------------------------
# Writing


def training_state(trainer: Trainer) -> dict[str, Any]:
    """Everything besides the weights and RNG that makes a resumed run continue exactly."""
    return {
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "skipped_samples": trainer.skipped_samples,
        "skipped_first": trainer.skipped_first,
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "objective": trainer.objective.state_dict(),
        "selection": trainer.selection.state_dict() if trainer.selection is not None else None,
        "epoch_loss": list(trainer.epoch_loss),
    }


def save_checkpoint(trainer: Trainer) -> Path:
    """Write the checkpoint of `trainer.state` in one rename, point `latest` at it and prune the oldest."""
    folder, state = checkpoint_folder(trainer.run_dir), trainer.state
    target = folder / epoch_folder(state.epoch, state.step, mid_epoch=state.batch != 0)
    with atomic_dir(target) as tmp:
        weights = state_for_saving(trainer.model)
        with writing(tmp / WEIGHTS, tensor_bytes(weights)):
            save_file(weights, str(tmp / WEIGHTS))
        progress = {"epoch": state.epoch, "step": state.step, "batch": state.batch, "rng": rng_state()}
        write_state(tmp, {**progress, **training_state(trainer)})
    with atomic_write(folder / LATEST) as tmp:
        tmp.write_text(target.name)
    for old in list_checkpoints(folder)[: -trainer.cfg.train.keep_checkpoints]:
        shutil.rmtree(old)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[TrainState, dict[str, Any]]:
    """Restore weights; return the train state and the rest for `restore_training` once it is built.

    The RNG state stays in the rest (under "rng"), not applied: setting a run up draws random numbers (data loaders
    of cached towers), so the loop applies it where the saved run stood (`loop._epoch_iterator`).
    """
    payload = read_state(path)
    load_weights(path, model)
    try:
        state = TrainState(int(payload.pop("epoch")), int(payload.pop("step")), int(payload.pop("batch", 0)))
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path / STATE_JSON}: damaged progress or RNG state ({e})") from None
    return state, payload


def restore_training(
    rest: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: Any | None,
    objective: torch.nn.Module,
    source: Path,
) -> int:
    """Load what `training_state` saved into the freshly built objects; return the count of skipped samples."""
    try:
        optimizer.load_state_dict(rest["optimizer"])
        scheduler.load_state_dict(rest["scheduler"])
        if ema is not None:
            ema.load_state_dict(rest["ema"])
        if rest.get("objective"):
            objective.load_state_dict(rest["objective"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{source}: its optimizer / EMA / objective state does not fit this run ({e}); resume with the run's "
            "own config.yaml or start a new `name`"
        ) from None
    return int(rest.get("skipped_samples", 0))


# ---------------------------------------------------------------------------------------------------------------
# The best evaluation's weights


def save_best(folder: Path, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
    """Write `folder/best`: the evaluated weights training changed, and where they were evaluated (best.json)."""
    target = folder / BEST
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / "best.json").write_text(json.dumps(record, indent=2))
    return target


def load_best(folder: Path, model: torch.nn.Module) -> dict[str, Any] | None:
    """Load `folder/best`'s weights into `model` (the tensors it lacks are frozen, hence unchanged); its record."""
    target = folder / BEST
    if not (target / "best.json").is_file():
        return None
    foreign = model.load_state_dict(_read_tensors(target / WEIGHTS), strict=False).unexpected_keys
    if foreign:
        raise CheckpointError(f"{target}: weights {foreign[:3]} are not in this model; the folder is not this run's")
    return json.loads((target / "best.json").read_text())
