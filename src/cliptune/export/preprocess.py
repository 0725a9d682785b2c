"""`preprocess.json`: a model's eval image preprocessing (torchvision steps) as plain settings other runtimes follow."""

from __future__ import annotations

from typing import Any

from torchvision import transforms as T

from cliptune.models.base import ExportUnsupported


def describe(transform: Any) -> dict[str, Any]:
    """Resize (shortest edge or exact size), centre crop, [0, 1] scaling, mean and std of a torchvision pipeline.

    Every cliptune backend's eval transform is a `Compose` of these torchvision steps (plus open_clip's image mode
    conversion); anything else cannot be written as settings, and saying so beats writing half a pipeline.
    """
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    out: dict[str, Any] = {"mode": "RGB"}
    for step in steps:
        if isinstance(step, T.Resize):
            size = step.size if isinstance(step.size, int) else list(step.size)
            single = isinstance(size, int) or len(size) == 1
            out["resize"] = {"shortest_edge": size if isinstance(size, int) else size[0]} if single else size
            out["interpolation"] = step.interpolation.value
        elif isinstance(step, T.CenterCrop):
            out["crop"] = list(step.size)
        elif isinstance(step, T.ToTensor):
            out["rescale"] = 1 / 255
        elif isinstance(step, T.Normalize):
            out["mean"], out["std"] = [float(m) for m in step.mean], [float(s) for s in step.std]
        elif isinstance(getattr(step, "mode", None), str):  # open_clip's MaybeConvertMode: PIL convert(mode)
            out["mode"] = step.mode
        elif getattr(step, "__name__", "") != "_convert_to_rgb":
            raise ExportUnsupported(f"the eval preprocessing step {step!r} cannot be written to preprocess.json")
    return out
