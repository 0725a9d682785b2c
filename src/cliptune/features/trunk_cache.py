"""The outputs of locked towers' trunks, computed once per input and reused by training and evaluation.

A frozen tower gives the same features for the same input every time, so a run computes each image's or caption's
trunk output once: training takes them instead of raw inputs (`cliptune.train.data`), evaluation puts only the
trainable head on top (`cliptune.features.encoding.Encoding`), and both share one `TrunkCache`. With a
`FeatureStore` the outputs also outlive the run.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from cliptune.features.batches import BatchRunner
from cliptune.features.store import FeatureStore, input_key, tower_fingerprint
from cliptune.models.base import ClipModel, Tower


def can_cache(model: ClipModel, tower: Tower) -> bool:
    """A tower's output can be cached when the backend splits it from its (trainable) projection head."""
    return model.has_trunk(tower)


class TrunkCache:
    """Trunk outputs of the towers in `cached` (those the model can split), per input, in memory and in `store`."""

    def __init__(self, runner: BatchRunner, cached: Sequence[Tower] = (), store: FeatureStore | None = None) -> None:
        model = runner.model
        self.runner = runner
        self.cached = [t for t in cached if can_cache(model, t)]
        self.store = store
        # keyed by image file (path, size, mtime) or caption text; in-memory images are never cached
        self.memo: dict[Tower, dict[str, torch.Tensor]] = {"image": {}, "text": {}}
        # Each image's key (path, size, mtime) is read once per cache: a run sees its files as they were when it
        # first met them, and stat + resolve for every sample of every epoch cost the quickstart ~2 s.
        self.keys: dict[tuple[Tower, str | Path], str] = {}
        self.fingerprints = {t: tower_fingerprint(model, t, runner.precision) for t in self.cached} if store else {}
        for tower, fingerprint in self.fingerprints.items():
            self.memo[tower] = store.load(fingerprint)

    def trunk_features(self, tower: Tower, items: Sequence) -> torch.Tensor:
        """Outputs of a cached tower's trunk for `items` (paths or captions), computing only those not seen before."""
        memo = self.memo[tower]
        keys = [self.key(item, tower) for item in items]
        first = dict(zip(keys, items))
        missing = [k for k in first if k not in memo]
        if missing:
            fn = functools.partial(self.runner.model.trunk, tower)
            todo = [first[k] for k in missing]
            desc = f"encoding {tower}s (locked tower, once)"
            run = self.runner.run_images if tower == "image" else self.runner.run_texts
            memo.update(zip(missing, run(fn, todo, desc)))
            self.save(tower)
        return torch.stack([memo[k] for k in keys])

    def key(self, item: str | Path, tower: Tower) -> str:
        key = self.keys.get((tower, item))
        if key is None:
            key = self.keys[(tower, item)] = input_key(item, tower)
        return key

    def save(self, tower: Tower) -> None:
        """Write `tower`'s outputs to the store, when there is one (entries added to `memo` directly included)."""
        if self.store is not None:
            self.store.save(self.fingerprints[tower], self.memo[tower])
