"""Batched, gradient-free encoding of images and captions into L2-normalised embeddings.

`Encoding` also remembers what a locked tower produced: a frozen tower gives the same features for the same
input every time, so each image or caption goes through it once per run, not once per evaluation or epoch.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
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


def default_workers(count: int, batch_size: int) -> int:
    """Decode images in worker processes while the model encodes, unless there are too few to pay their start-up."""
    return 0 if count <= 4 * batch_size else min(4, os.cpu_count() or 1)


@contextlib.contextmanager
def channels_last(model: torch.nn.Module, images: bool) -> Iterator[torch.memory_format]:
    """Run convolutions over image batches in channels-last layout; yields the layout for the input batches.

    On CPU, channels-last convolutions are faster (EfficientNet-Lite0: 1.3x here, `benchmarks/search.py`) and equal
    to float rounding (3e-7); models without convolutions are left alone. A model converted here returns to its
    own layout afterwards, so training keeps the layout its config asked for.
    """
    convs = [p for p in model.parameters() if p.dim() == 4]
    if not images or not convs or convs[0].is_contiguous(memory_format=torch.channels_last):
        yield torch.channels_last if images and convs else torch.preserve_format
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        model.to(memory_format=torch.contiguous_format)


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
        self.fingerprints = {t: tower_fingerprint(model, t, precision) for t in self.cached} if store else {}
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
        with channels_last(self.model, isinstance(batches, DataLoader)) as layout:
            for batch in tqdm(batches, desc=desc, disable=not self.progress or desc is None, leave=False):
                with autocast(device, self.precision):
                    out.append(fn(batch.to(device, memory_format=layout)).float().cpu())
        self.model.train(was_training)
        return torch.cat(out)

    def _image_batches(self, items: Sequence[ImageItem]) -> DataLoader:
        dataset = ImageFiles(list(items), self.model.eval_transform)
        workers = self.workers or default_workers(len(items), self.batch_size)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=workers)

    def _text_batches(self, texts: Sequence[str]) -> list[torch.Tensor]:
        size = self.batch_size * 4  # text is far cheaper than images per item
        return [self.model.tokenize(list(texts[i : i + size])) for i in range(0, len(texts), size)]

    def _run_texts(self, fn: Callable[[torch.Tensor], torch.Tensor], texts: Sequence[str], desc: str) -> torch.Tensor:
        """`fn` over captions batched in order of length, returned in input order.

        Text towers stop at their batch's longest caption; batches of similar lengths leave them little padding.
        """
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = self._run(fn, self._text_batches([texts[i] for i in order]), desc)
        return out[torch.argsort(torch.tensor(order))]

    def trunk_features(self, tower: Tower, items: Sequence) -> torch.Tensor:
        """Outputs of a cached tower's trunk for `items` (paths or captions), computing only those not seen before."""
        memo = self.memo[tower]
        keys = [input_key(item, tower) for item in items]
        first = dict(zip(keys, items))
        missing = [k for k in first if k not in memo]
        if missing:
            fn = functools.partial(self.model.trunk, tower)
            todo = [first[k] for k in missing]
            desc = f"encoding {tower}s (locked tower, once)"
            if tower == "image":
                memo.update(zip(missing, self._run(fn, self._image_batches(todo), desc)))
            else:
                memo.update(zip(missing, self._run_texts(fn, todo, desc)))
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
            features = self._run_texts(self.model.encode_text, items, "encoding texts")
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
