"""Writing a model in the formats other tools load: cliptune's own, open_clip, Hugging Face transformers, ONNX.

One module per format, each a `write(model, folder, **options) -> report` in the `FORMATS` table. `export` finds
the model (run directory, saved or exported folder, model spec, or a model object), applies WiSE-FT, folds LoRA
adapters into the weights, writes into a temporary folder that takes the target's place only once the format has
been written and checked (an export is whole or absent), and returns what it measured.
"""

from __future__ import annotations

import copy
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cliptune.export import hf, native, onnx, open_clip_dir
from cliptune.models import ClipModel
from cliptune.utils.files import atomic_dir

Writer = Callable[..., dict[str, Any]]
# format name -> writer. A new format adds one module and one line here.
FORMATS: dict[str, Writer] = {
    "cliptune": native.write,
    "open_clip": open_clip_dir.write,
    "hf": hf.write,
    "onnx": onnx.write,
}
# Exported folders that `cliptune.load` reads back: which files mark one, and the reader.
READERS = ((open_clip_dir.is_export, open_clip_dir.read), (hf.is_export, hf.read))
# Files that mark a folder as an earlier export, which a new one may replace.
_EXPORT_MARKERS = ("model.json", open_clip_dir.CONFIG_FILE, "config.json", onnx.IMAGE_FILE)


def export(
    model: ClipModel | str | Path,
    format: str = "cliptune",
    out: str | Path = "export",
    alpha: float | None = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Write `model` as `format` into the folder `out`; returns the report (files, sizes, max difference, ...).

    `model`: a run directory, saved or exported model folder, model spec (`ViT-B-32:openai`) or a `ClipModel`.
    `alpha`: WiSE-FT interpolation between the run's starting and final weights (needs a run directory).
    `quantize`: "int8" adds onnxruntime dynamically quantized graphs (ONNX only), with the retrieval change.
    """
    if format not in FORMATS:
        raise ValueError(f"export format {format!r} is unknown; choose one of {', '.join(FORMATS)}")
    if quantize is not None and format != "onnx":
        raise ValueError(f"--quantize applies to the onnx format only, not {format!r}")
    out = Path(out)
    _check_target(out)
    prepared = _prepare(_resolve(model, alpha))
    started = time.perf_counter()
    was_training = prepared.training
    try:
        # Not under no_grad: torch then swaps MultiheadAttention for a fused kernel that ONNX has no operator for.
        with atomic_dir(out) as tmp:
            report = FORMATS[format](prepared.eval(), tmp, quantize=quantize)
    finally:
        prepared.train(was_training)
    files = {p.name: p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    seconds = round(time.perf_counter() - started, 2)
    return {"format": format, "out": str(out), "seconds": seconds, "files": files, **report}


def _resolve(model: ClipModel | str | Path, alpha: float | None) -> ClipModel:
    from cliptune.inference import load_any

    if alpha is None:
        return load_any(model)
    if isinstance(model, ClipModel) or not Path(model).expanduser().is_dir():
        raise ValueError(
            f"--alpha {alpha}: WiSE-FT interpolates a run's starting and final weights, so --model must be a run "
            "directory (with initial.safetensors and model/)"
        )
    from cliptune.tuning.wise import interpolated_model

    return interpolated_model(Path(model).expanduser(), alpha)


def _prepare(model: ClipModel) -> ClipModel:
    """The model on CPU in fp32 with LoRA adapters merged: exactly the weights it embeds with.

    A model that is already so is used as it is (deep-copying one also copies its tokenizer's tables: seconds);
    otherwise a copy is changed, never the caller's model.
    """
    from cliptune.tuning.lora import has_lora, merge_lora

    tensors = [*model.parameters(), *model.buffers()]
    plain = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors)
    if plain and not has_lora(model):
        return model
    model = copy.deepcopy(model).float().cpu()
    return merge_lora(model) if has_lora(model) else model


def _check_target(out: Path) -> None:
    # The export replaces the target folder as a whole: never a folder of something else.
    if out.is_file():
        raise ValueError(f"--out {out} is a file; give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in _EXPORT_MARKERS):
        raise ValueError(f"--out {out} is a non-empty folder that holds no earlier export; choose a new folder")


def read_export(folder: Path) -> ClipModel | None:
    """An exported open_clip or hf folder as a cliptune model; None for any other folder."""
    for is_export, read in READERS:
        if is_export(folder):
            return read(folder)
    return None


__all__ = ["FORMATS", "export", "read_export"]


class _CallableModule(types.ModuleType):
    """`cliptune.export(model, "hf", "out")` is the API the docs promise, and `cliptune.export` is also this package:
    importing a submodule rebinds the parent's attribute to the module, so the module itself must be callable."""

    def __call__(
        self, model: ClipModel | str | Path, format: str = "cliptune", out: str | Path = "export", **kwargs: Any
    ) -> dict[str, Any]:
        return export(model, format, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
