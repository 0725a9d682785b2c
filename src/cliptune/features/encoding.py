"""Batched, gradient-free encoding of images and captions into L2-normalised embeddings.

A tower listed in `cached` goes through its trunk once per input (`cliptune.features.TrunkCache`, shared with
training), and only its head runs at each evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from cliptune.features.batches import BatchRunner, ImageItem
from cliptune.features.store import FeatureStore
from cliptune.features.trunk_cache import TrunkCache
from cliptune.models.base import ClipModel, Tower


class Encoding:
    """Encodes with `model` in eval mode; towers listed in `cached` keep their trunk outputs per input."""

    def __init__(
        self,
        model: ClipModel,
        precision: str = "fp32",
        batch_size: int = 64,
        workers: int = 0,
        cached: Sequence[Tower] = (),
        progress: bool = False,
        store: FeatureStore | None = None,
    ) -> None:
        self.model, self.precision, self.batch_size, self.workers = model, precision, batch_size, workers
        self.progress = progress
        self.runner = BatchRunner(model, precision, batch_size, workers, progress)
        self.trunks = TrunkCache(self.runner, cached, store)

    @property
    def cached(self) -> list[Tower]:
        """The towers whose trunk outputs are kept (those in `cached` that the model splits into trunk and head)."""
        return self.trunks.cached

    def _embed(self, tower: Tower, items: Sequence) -> torch.Tensor:
        if not items:
            return torch.empty(0, 0)
        if tower in self.cached and not any(isinstance(i, Image.Image) for i in items):
            head = functools.partial(self.model.head, tower)
            features = self.runner.run(head, [self.trunks.trunk_features(tower, items)], desc=None)
        elif tower == "image":
            features = self.runner.run_images(self.model.encode_image, items, "encoding images")
        else:
            features = self.runner.run_texts(self.model.encode_text, items, "encoding texts")
        # re-normalise in float32: a bf16 unit vector is only unit to about 1e-2
        return F.normalize(features, dim=-1)

    def images(self, items: Sequence[ImageItem]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of normalised image embeddings, in input order."""
        return self._embed("image", list(items))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of normalised caption embeddings, in input order."""
        return self._embed("text", list(texts))


def encode_images(
    model: ClipModel, images: Sequence[ImageItem], batch_size: int = 64, precision: str = "fp32", workers: int = 0
) -> torch.Tensor:
    return Encoding(model, precision, batch_size, workers).images(images)


def encode_texts(model: ClipModel, texts: Sequence[str], batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    return Encoding(model, precision, batch_size).texts(texts)
