"""Batched, gradient-free encoding of images and captions into L2-normalised embeddings."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from cliptune.data import ImageFiles
from cliptune.models.base import ClipModel


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: ClipModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(
    model: ClipModel,
    images: Sequence[str | Path | Image.Image],
    batch_size: int = 64,
    precision: str = "fp32",
    workers: int = 0,
) -> torch.Tensor:
    """(N, D) float32 CPU tensor of normalised image embeddings, in input order."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    loader = DataLoader(ImageFiles(list(images), model.eval_transform), batch_size=batch_size, num_workers=workers)
    out = []
    for batch in loader:
        with autocast(device, precision):
            # re-normalise in float32: a bf16 unit vector is only unit to about 1e-2
            out.append(F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def encode_texts(
    model: ClipModel, texts: Sequence[str], batch_size: int = 256, precision: str = "fp32"
) -> torch.Tensor:
    """(N, D) float32 CPU tensor of normalised caption embeddings, in input order."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(list(texts[start : start + batch_size])).to(device)
        with autocast(device, precision):
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)
