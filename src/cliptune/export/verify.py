"""Checking an export against the model it came from: the same images and captions through both, max difference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cliptune.models import ClipModel

# Captions of different lengths, punctuation and case: the text side of every export check.
CAPTIONS = ["a photo of a cat", "A RED square, on the grass!", "", "two dogs playing in the snow near a lake"]


def sample_images(model: ClipModel, count: int, seed: int = 0) -> torch.Tensor:
    """`count` random images, already at the model's input size and normalisation (what its eval transform gives)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(count, 48, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return torch.stack([model.eval_transform(Image.fromarray(p)) for p in pixels])


@torch.no_grad()
def max_difference(
    model: ClipModel,
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[list[str]], torch.Tensor],
) -> float:
    """Largest |difference| of L2-normalised embeddings between `model` and another implementation of it."""
    images = sample_images(model, 3)
    ours = (model.encode_image(images), model.encode_text(model.tokenize(CAPTIONS)))
    theirs = (encode_image(images), encode_text(CAPTIONS))
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, theirs))
