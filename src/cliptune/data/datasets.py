"""Torch datasets over checked data: training image-caption pairs and plain image lists for evaluation."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cliptune.data.errors import DataError
from cliptune.data.images import load_rgb
from cliptune.data.tables import CaptionTable

logger = logging.getLogger("cliptune.data")

Transform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], torch.Tensor]
Sample = tuple[torch.Tensor, ...]
# (caption, seed) -> hard-negative captions of it (cliptune.data.negatives.NegativeGenerator.negatives, or a lookup).
NegativeSource = Callable[[str, str], list[str]]


def caption_groups(captions: list[str]) -> torch.Tensor:
    """Group ids (int64, shape (len(captions),)) equal exactly for captions identical up to case and whitespace.

    The id is a hash of the normalised caption (stripped, runs of whitespace made one space, casefolded), not a
    position in this list, so that identical captions get the same id on every rank and in every batch: the groups
    of a distributed batch are then right without any exchange of strings. Two different captions share an id with
    probability about 2^-64 per pair.
    """
    ids = []
    for caption in captions:
        key = " ".join(caption.split()).casefold().encode()
        ids.append(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True))
    return torch.tensor(ids, dtype=torch.long)


def caption_index(seed: int, epoch: int, key: int | str, count: int) -> int:
    """Which of `count` captions sample `key` draws in `epoch`: one rule for tables and shards."""
    if count == 1:
        return 0
    # A string seed is hashed with SHA-512 by `random`, never with Python's salted `hash`, so the draw is the
    # same in every worker process and run, and distinct triples never share a seed by arithmetic accident.
    return random.Random(f"{seed}:{epoch}:{key}").randrange(count)


def sample_seed(seed: int, epoch: int, index: int | str) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, index): the same in every worker, rank and run."""
    return random.Random(f"augment:{seed}:{epoch}:{index}").getrandbits(63)


@dataclass(frozen=True)
class Skip:
    """Stands in for a training sample its dataset could not give: which one (a path, or a shard and key) and why.

    A dataset returns it rather than dropping the sample, so that `collate_skip_none` lists it on the batch: the
    trainer then counts and names skips in the main process even when DataLoader workers do the loading, and a
    stream keeps the length its manifest promised (every rank plans its steps from that).
    """

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


class Collated(tuple):
    """A batch: the stacked columns of its samples, and `skipped`, the `Skip`s dropped from it."""

    skipped: tuple[Skip, ...] = ()


class TrainPairs(Dataset):
    """(image tensor, 1-D token tensor) per image of a table; the caption is drawn from (seed, epoch, index).

    With `image_features` ([images, F]) or `text_features` ([captions in `table.flat()` order, F]) given, the
    sample holds that precomputed row instead: what a locked tower produced once, reused every epoch.

    Extra fields, after (image, tokens), in `fields` order: `group` (with `labels` or `groups=True`) is an id shared by
    samples that are not negatives of each other (the image's class label, else the id of its caption text: label-aware
    targets); `negatives` ([hard_negatives, L] tokens) and `negative_mask` ([hard_negatives] bool, False where the
    caption admitted fewer negatives) come from `negatives`, a function of (caption, seed) that is called here, in the
    loader, so generating them runs in the worker processes.

    Random augmentation of sample `index` in `epoch` draws from a generator seeded by (seed, epoch, index) only, so a
    sample is augmented the same way whatever the number of workers or processes (a 2-process run sees exactly the
    images a 1-process run does) and a resumed run replays it.

    An image that fails to load here (deleted or corrupt since the table was checked) gives a `Skip`, which
    `collate_skip_none` drops and lists on the batch. `failed` holds the paths that failed and `skipped` counts the
    skipped samples, both in the process that loaded them (with DataLoader workers they stay in the workers; the
    main process sees the batch's `skipped`).
    """

    def __init__(
        self,
        table: CaptionTable,
        transform: Transform,
        tokenize: Tokenize,
        seed: int,
        image_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        *,
        labels: list[int] | None = None,
        groups: bool = False,
        negatives: NegativeSource | None = None,
        hard_negatives: int = 1,
    ) -> None:
        self.table = table
        self.labels = labels
        self.negatives = negatives
        self.hard_negatives = hard_negatives
        self.fields = ("image", "tokens")
        if labels is not None or groups:
            self.fields += ("group",)
        if negatives is not None:
            self.fields += ("negatives", "negative_mask")
        self.image_features = image_features
        self.text_features = text_features
        self.caption_offsets = [0]
        for captions in table.captions[:-1]:
            self.caption_offsets.append(self.caption_offsets[-1] + len(captions))
        self.transform = transform
        self.tokenize = tokenize
        self.seed = seed
        self.epoch = 0
        self.failed: set[Path] = set()
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose captions are drawn; call before iterating (and before workers start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.table.images)

    def caption_index(self, index: int, epoch: int | None = None) -> int:
        """Which caption of image `index` is drawn in `epoch` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        return caption_index(self.seed, epoch, index, len(self.table.captions[index]))

    def caption(self, index: int, epoch: int | None = None) -> str:
        """The caption drawn for image `index` in `epoch` (default: the current epoch)."""
        return self.table.captions[index][self.caption_index(index, epoch)]

    def _text(self, index: int) -> torch.Tensor:
        if self.text_features is not None:
            return self.text_features[self.caption_offsets[index] + self.caption_index(index)]
        tokens = self.tokenize([self.caption(index)])
        return tokens[0] if tokens.dim() > 1 else tokens

    def _group(self, index: int) -> torch.Tensor:
        if self.labels is not None:
            return torch.tensor(self.labels[index])
        return caption_groups([self.caption(index)])[0]

    def _negatives(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.negatives is not None
        found = self.negatives(self.caption(index), f"{self.seed}:{self.epoch}:{index}")[: self.hard_negatives]
        missing = self.hard_negatives - len(found)
        # Slots without a negative hold an empty caption's tokens so the batch stacks; the mask keeps them out of
        # every softmax.
        tokens = self.tokenize([*found, *([""] * missing)])
        mask = torch.tensor([True] * len(found) + [False] * missing)
        return tokens, mask

    def _extras(self, index: int) -> tuple[torch.Tensor, ...]:
        extras: tuple[torch.Tensor, ...] = ()
        if "group" in self.fields:
            extras += (self._group(index),)
        if self.negatives is not None:
            extras += self._negatives(index)
        return extras

    def _image(self, index: int) -> torch.Tensor | Skip:
        if self.image_features is not None:
            return self.image_features[index]
        path = self.table.images[index]
        try:
            image = load_rgb(path)
        except Exception as e:
            self.skipped += 1
            if path not in self.failed:
                self.failed.add(path)
                logger.warning("%s: could not be loaded (%s); skipping it in training", path, e)
            return Skip(str(path), f"could not be loaded: {e}")
        return seeded_transform(self.transform, image, sample_seed(self.seed, self.epoch, index))

    def __getitem__(self, index: int) -> Sample | Skip:
        image = self._image(index)
        if isinstance(image, Skip):
            return image
        return image, self._text(index), *self._extras(index)


def seeded_transform(transform: Transform, image: Image.Image, seed: int) -> torch.Tensor:
    """`transform(image)` with torch's, Python's and NumPy's generators seeded by `seed`, all restored afterwards.

    NumPy too: timm's RandAugment picks its operations with `np.random`.
    """
    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return transform(image)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def collate_skip_none(batch: Sequence[Sample | Skip | None]) -> Collated:
    """Stack the given samples field by field, dropping `Skip`s (and Nones) but listing the `Skip`s on the result.

    The number dropped is `len(batch) - len(result[0])`; in the main process that is `batch_size - images.shape[0]`
    (exact with `drop_last=True`). When every sample was dropped the result is empty (falsy): the caller skips it.
    """
    kept = [sample for sample in batch if sample is not None and not isinstance(sample, Skip)]
    out = Collated(torch.stack(column) for column in zip(*kept))
    out.skipped = tuple(sample for sample in batch if isinstance(sample, Skip))
    return out


class ImageFiles(Dataset):
    """Transformed images from paths (loaded as RGB) or PIL images (passed to `transform` as they are)."""

    def __init__(self, items: Sequence[str | Path | Image.Image], transform: Transform) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        if isinstance(item, Image.Image):
            return self.transform(item)
        try:
            image = load_rgb(item)
        except Exception as e:  # evaluation sets were checked when read, so a failure here means the file changed
            raise DataError(
                f"{item}: could not be loaded ({e}); it was readable when the set was read, so it was probably "
                f"moved, deleted or overwritten since. Restore it, or re-read the set to skip it"
            ) from e
        return self.transform(image)
