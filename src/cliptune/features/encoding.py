"""Batched, gradient-free encoding of images and captions into L2-normalised embeddings.

A tower listed in `cached` goes through its trunk once per input (`cliptune.features.TrunkCache`, shared with
training), and only its head runs at each evaluation.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from cliptune.features.batches import BatchRunner, ImageItem
from cliptune.features.store import FeatureStore
from cliptune.features.trunk_cache import TrunkCache
from cliptune.models.base import ClipModel, TextOverflow, Tower

logger = logging.getLogger("cliptune.eval")


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
        self.overflow: dict[str, OverflowCount] = {}  # what `report_overflow` found, per set of captions

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

    def report_overflow(self, texts: Sequence[str], where: str) -> TextOverflow | None:
        """`warn_overflow` once per `where` (a set's description) for this encoding: a run's evaluations share it,
        so a set that is scored every epoch is named once; `overflow` keeps each set's count for the run's report."""
        if where not in self.overflow:
            found = warn_overflow(self.model, texts, where)
            first = _short(texts[found.first]) if found is not None and found.first is not None else None
            self.overflow[where] = OverflowCount(len(texts), found, first)
        return self.overflow[where].found

    def overflow_counts(self) -> list[dict[str, Any]]:
        """Per set counted so far: {set, texts, truncated, context_length, first} (a run's results.json
        `text_overflow`; `first` is the start of the first text cut short, or None); sets the model cannot count
        for are left out."""
        return [
            {
                "set": where,
                "texts": count.texts,
                "truncated": count.found.truncated,
                "context_length": count.found.context_length,
                "first": count.first,
            }
            for where, count in self.overflow.items()
            if count.found is not None
        ]


class OverflowCount(NamedTuple):
    """How many texts a set had, what `ClipModel.text_overflow` found among them (None: cannot count), and the
    first text cut short."""

    texts: int
    found: TextOverflow | None
    first: str | None


def warn_overflow(model: ClipModel, texts: Sequence[str], where: str) -> TextOverflow | None:
    """Warn how many of `texts` are longer than the model's text context, and so cut short by its tokenizer;
    returns the count (`ClipModel.text_overflow`), None where the model cannot count."""
    found = model.text_overflow(list(texts))
    if found is not None and found.truncated:
        logger.warning(
            "%s: %d of %d captions are longer than the model's text context of %d tokens and are cut short to it "
            "(first: %s); shorten them, or use a model with a longer context",
            where,
            found.truncated,
            len(texts),
            found.context_length,
            _excerpt(texts[found.first]),
        )
    return found


def _excerpt(text: str) -> str:
    return repr(_short(text))


def _short(text: str, length: int = 60) -> str:
    return text if len(text) <= length else text[:length] + "..."


def encode_images(
    model: ClipModel, images: Sequence[ImageItem], batch_size: int = 64, precision: str = "fp32", workers: int = 0
) -> torch.Tensor:
    return Encoding(model, precision, batch_size, workers).images(images)


def encode_texts(model: ClipModel, texts: Sequence[str], batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    return Encoding(model, precision, batch_size).texts(texts)
