"""Batched, gradient-free encoding of images and captions into L2-normalised embeddings.

`Encoding` also remembers what a locked tower produced: a frozen tower gives the same features for the same
input every time, so each image or caption goes through it once per run, not once per evaluation or epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from cliptune.data import ImageFiles
from cliptune.eval.feature_store import FeatureStore, input_key, tower_fingerprint
from cliptune.models.base import ClipModel, Tower
from cliptune.utils.precision import autocast

ImageItem = str | Path | Image.Image


def model_device(model: ClipModel) -> torch.device:
    return next(model.parameters()).device


def can_cache(model: ClipModel, tower: Tower) -> bool:
    """A tower's output can be cached when the backend splits it from its (trainable) projection head."""
    return model.has_trunk(tower)


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
        self.cached = [t for t in cached if can_cache(model, t)]
        self.progress = progress
        self.store = store
        # keyed by image file (path, size, mtime) or caption text; in-memory images are never cached
        self.memo: dict[Tower, dict[str, torch.Tensor]] = {"image": {}, "text": {}}
        self.fingerprints = {t: tower_fingerprint(model, t) for t in self.cached} if store else {}
        for tower, fingerprint in self.fingerprints.items():
            self.memo[tower] = store.load(fingerprint)

    @torch.no_grad()
    def _run(
        self, fn: Callable[[torch.Tensor], torch.Tensor], batches: Sequence | DataLoader, desc: str | None
    ) -> torch.Tensor:
        device = model_device(self.model)
        was_training = self.model.training
        self.model.eval()
        out = []
        for batch in tqdm(batches, desc=desc, disable=not self.progress or desc is None, leave=False):
            with autocast(device, self.precision):
                out.append(fn(batch.to(device)).float().cpu())
        self.model.train(was_training)
        return torch.cat(out)

    def _image_batches(self, items: Sequence[ImageItem]) -> DataLoader:
        dataset = ImageFiles(list(items), self.model.eval_transform)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers)

    def _text_batches(self, texts: Sequence[str]) -> list[torch.Tensor]:
        size = self.batch_size * 4  # text is far cheaper than images per item
        return [self.model.tokenize(list(texts[i : i + size])) for i in range(0, len(texts), size)]

    def trunk_features(self, tower: Tower, items: Sequence) -> torch.Tensor:
        """Outputs of a cached tower's trunk for `items` (paths or captions), computing only those not seen before."""
        memo = self.memo[tower]
        keys = [input_key(item, tower) for item in items]
        first = dict(zip(keys, items))
        missing = [k for k in first if k not in memo]
        if missing:
            fn = functools.partial(self.model.trunk, tower)
            todo = [first[k] for k in missing]
            batches = self._image_batches(todo) if tower == "image" else self._text_batches(todo)
            memo.update(zip(missing, self._run(fn, batches, f"encoding {tower}s (locked tower, once)")))
            if self.store is not None:
                self.store.save(self.fingerprints[tower], memo)
        return torch.stack([memo[k] for k in keys])

    def _embed(self, tower: Tower, items: Sequence) -> torch.Tensor:
        if not items:
            return torch.empty(0, 0)
        if tower in self.cached and not any(isinstance(i, Image.Image) for i in items):
            head = functools.partial(self.model.head, tower)
            features = self._run(head, [self.trunk_features(tower, items)], desc=None)
        elif tower == "image":
            features = self._run(self.model.encode_image, self._image_batches(items), "encoding images")
        else:
            features = self._run(self.model.encode_text, self._text_batches(items), "encoding texts")
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
