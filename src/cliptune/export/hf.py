"""The `hf` export format: a transformers `save_pretrained` folder (model, tokenizer, image processor).

`CLIPModel.from_pretrained(DIR)` / `AutoModel.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)` load it.
Which transformers model holds a cliptune model is the model's own answer (`to_hf`); this module writes and checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cliptune.export.verify import max_difference
from cliptune.models import ClipModel


def write(model: ClipModel, folder: Path, **_: Any) -> dict[str, Any]:
    bundle = model.to_hf()
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    bundle.image_processor.save_pretrained(folder)
    return {"max_abs_diff": _verify(model, folder)}


def _verify(model: ClipModel, folder: Path) -> float:
    """Largest embedding difference between `model` and what transformers loads from the folder."""
    from transformers import AutoModel, AutoTokenizer

    loaded = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return F.normalize(_pooled(loaded.get_image_features(pixel_values=images)), dim=-1)

    def encode_text(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        # SigLIP was trained on full padding without a mask (its processor passes none); CLIP reads the mask.
        mask = batch.get("attention_mask") if loaded.config.model_type == "clip" else None
        features = loaded.get_text_features(input_ids=batch["input_ids"], attention_mask=mask)
        return F.normalize(_pooled(features), dim=-1)

    return max_difference(model, encode_image, encode_text)


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected embedding; 4.x a bare tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def is_export(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "model.json").is_file()


def read(folder: Path) -> ClipModel:
    """The exported folder as a cliptune model (the hf backend loads save_pretrained folders)."""
    from cliptune.config import ModelConfig
    from cliptune.models import build_model

    return build_model(ModelConfig(backend="hf", arch=str(folder.resolve()))).eval()
