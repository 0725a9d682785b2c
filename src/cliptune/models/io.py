"""Saving a model as spec + safetensors weights, and loading it back offline with identical embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cliptune.models.base import ClipModel
from cliptune.models.errors import ModelError
from cliptune.utils.files import atomic_write, tensor_bytes
from cliptune.utils.paths import inside

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
# The types of the fields any backend's spec() writes (wrappers nest their base's spec under `base`); a field of
# another type is a damaged or hand-edited model.json, reported by name before any backend reads it.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "backend": str,
    "arch": str,
    "base": dict,
    "n": int,
    "heads": str,
    "classes": list,
    "dim": int,
    "quick_gelu": bool,
    "preprocess": (dict, type(None)),
    "model_type": str,
    "image_tower": dict,
    "text_tower": dict,
    "head": str,
    "embed_dim": int,
    "init_temperature": (int, float),
    "image_features": int,
    "text_features": int,
    "image_extras": dict,
    "token_length": int,
    "image_size": (int, list),  # model.image_size: openclip [h, w], composed a side
}


def state_for_saving(model: ClipModel) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights); contiguous clones are always safe.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: ClipModel, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = state_for_saving(model)
    with atomic_write(folder / WEIGHTS_FILE, needed=tensor_bytes(weights)) as tmp:
        save_file(weights, str(tmp))
    model.save_assets(folder)
    write_spec(model, folder)
    return folder


def write_spec(model: ClipModel, folder: Path) -> None:
    with atomic_write(folder / SPEC_FILE) as tmp:
        tmp.write_text(json.dumps(model.spec(), indent=2))


def read_spec(path: Path) -> dict[str, Any]:
    """A model.json as written by `spec()`, checked field by field; any fault names the file and the field."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text (byte {e.start}); it is not a model.json cliptune wrote") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror})") from None
    _check_spec(spec, path, "")
    return spec


def _check_spec(spec: Any, path: Path, prefix: str) -> None:
    from cliptune.models import BACKENDS, WRAPPERS  # the backend table imports this module

    if not isinstance(spec, dict):
        raise ModelError(f"{path}: {prefix or 'the top level'} must be a JSON object, got {type(spec).__name__}")
    backend, known = spec.get("backend"), [*BACKENDS, *WRAPPERS]
    if not isinstance(backend, str) or backend not in known:
        raise ModelError(f"{path}: field {prefix}backend is {backend!r}; it must be one of {', '.join(known)}")
    for key, value in spec.items():
        expected = _FIELD_TYPES.get(key)
        if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
            names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise ModelError(f"{path}: field {prefix}{key} is {value!r}; it must be a {names}")
    if "base" in spec:
        _check_spec(spec["base"], path, f"{prefix}base.")


def rebuild_from(path: Path, folder: Path) -> ClipModel:
    """The architecture the model.json at `path` describes, with `folder`'s assets; faults name the file."""
    from cliptune.models import rebuild  # the backend table imports this module

    spec = read_spec(path)
    try:
        return rebuild(spec, folder)
    except ModelError as e:
        raise ModelError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    except KeyError as e:
        raise ModelError(f"{path}: field {e.args[0]!r} is missing; the file is damaged or hand-edited") from None
    except (TypeError, AttributeError) as e:
        raise ModelError(f"{path}: a field has an unusable value ({e}); the file is damaged or hand-edited") from None


def load_weights_file(path: Path, model: torch.nn.Module, owner: str) -> None:
    """Load a safetensors file into `model`; a truncated, foreign or mismatched file names `owner` and why."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e}); it is truncated or foreign") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch's size-mismatch / missing-key report: its first lines say which tensors
        detail = "; ".join(str(e).splitlines()[:3])
        raise ModelError(f"{path} does not fit the model {owner} describes ({detail})") from None


def load_model(folder: str | Path) -> ClipModel:
    folder = Path(folder)
    spec_path, weights_path = inside(folder, SPEC_FILE, str(folder)), inside(folder, WEIGHTS_FILE, str(folder))
    if not spec_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{folder} holds no saved model: expected {SPEC_FILE} and {WEIGHTS_FILE} there")
    model = rebuild_from(spec_path, folder)
    load_weights_file(weights_path, model, str(spec_path))
    return model.eval()
