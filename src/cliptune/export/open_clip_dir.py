"""The `open_clip` export format: the folder open_clip writes for the hub, loaded with `local-dir:`.

`open_clip_config.json` ({"model_cfg", "preprocess_cfg"}), `open_clip_model.safetensors` and, for models whose
config names a Hugging Face tokenizer, its files: `open_clip.create_model_and_transforms("local-dir:DIR")` and
`open_clip.get_tokenizer("local-dir:DIR")` read exactly these (open_clip.push_to_hf_hub.save_for_hf writes them
too, but needs a tokenizer with `save_pretrained`, which open_clip's default BPE tokenizer lacks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cliptune.export.verify import max_difference
from cliptune.models import ClipModel

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def write(model: ClipModel, folder: Path, **_: Any) -> dict[str, Any]:
    bundle = model.to_open_clip()
    save_file(bundle.state_dict, str(folder / WEIGHTS_FILE))
    config = {"model_cfg": bundle.model_cfg, "preprocess_cfg": bundle.preprocess_cfg}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if bundle.save_tokenizer is not None:
        bundle.save_tokenizer(folder)
    return {"max_abs_diff": _verify(model, folder)}


def _verify(model: ClipModel, folder: Path) -> float:
    """Largest embedding difference between `model` and what open_clip itself loads from the folder."""
    import open_clip

    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    loaded.eval()

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return loaded.encode_image(images, normalize=True)

    def encode_text(texts: list[str]) -> torch.Tensor:
        return loaded.encode_text(tokenizer(texts), normalize=True)

    return max_difference(model, encode_image, encode_text)


def is_export(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def read(folder: Path) -> ClipModel:
    """The exported folder as a cliptune model (open_clip builds it from the folder)."""
    from cliptune.config import ModelConfig
    from cliptune.models import build_model

    return build_model(ModelConfig(backend="openclip", arch=f"local-dir:{folder.resolve()}")).eval()
