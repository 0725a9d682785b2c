"""Training augmentation: timm's image pipeline (`data.augment`) and timm's Mixup / CutMix (`data.mixup`).

Images: `timm.data.create_transform(is_training=True)` with the model's own input size, mean/std and interpolation,
so the augmented tensors fit the tower exactly as its evaluation transform does. TrivialAugment is torchvision's
(timm has none). Evaluation transforms are never touched. Every random draw of these transforms comes from Python's,
NumPy's or torch's global generator, which `cliptune.data.datasets.seeded_transform` seeds per (seed, epoch, sample).

Mixup / CutMix: timm's `Mixup` with its label smoothing, applied to each *pair* of consecutive samples of a batch
(samples 2j and 2j+1) with NumPy seeded by (seed, step, global pair index). timm mixes a batch with its reverse, so a
batch split over processes would pair different samples; pairs that never straddle a process boundary (every local
batch has an even size and starts at an even global index) make a 2-process run mix exactly what a 1-process run
does. The price: lambda and the mixup-or-cutmix choice are drawn per pair, not once per batch (timm's "pair" mode
in effect, not its default "batch" mode).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.mixup import Mixup, mixup_target
from torchvision import transforms as T

from cliptune.config import AugmentConfig, ConfigError, MixupConfig

if TYPE_CHECKING:
    from cliptune.models.base import ImagePreprocessing

Transform = Callable[[Image.Image], torch.Tensor]
TRIVIAL = "trivialaugment"


def hflip_probability(cfg: AugmentConfig, labelled: bool) -> float:
    """The configured flip probability; unset: 0.5 for class labels, 0 for captions (which say "left" and "right")."""
    if cfg.hflip is not None:
        return cfg.hflip
    return 0.5 if labelled else 0.0


def train_transform(cfg: AugmentConfig, pre: ImagePreprocessing, labelled: bool) -> Transform:
    """timm's training pipeline for `pre`'s input: random-resized crop, flip, policy or colour jitter, erasing."""
    trivial = cfg.auto_augment == TRIVIAL
    interpolation = cfg.interpolation or pre.interpolation
    try:
        transform = create_transform(
            pre.size,
            is_training=True,
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            hflip=hflip_probability(cfg, labelled),
            color_jitter=None if trivial else cfg.color_jitter,
            auto_augment=None if trivial else cfg.auto_augment,
            interpolation=interpolation,
            mean=pre.mean,
            std=pre.std,
            re_prob=cfg.re_prob,
            re_mode=cfg.re_mode,
            re_count=cfg.re_count,
            separate=trivial,
        )
    except (AssertionError, ValueError, KeyError) as e:  # timm's policy-string parser asserts
        raise ConfigError(f"data.augment: timm rejects these settings (auto_augment {cfg.auto_augment!r}): {e}") from e
    if not trivial:
        return _posterize_guarded(transform)
    crop_and_flip, _, to_tensor = transform  # the middle part (policy, jitter) is empty here
    mode = T.InterpolationMode(interpolation if interpolation != "random" else "bicubic")
    return T.Compose([*crop_and_flip.transforms, T.TrivialAugmentWide(interpolation=mode), *to_tensor.transforms])


def posterize(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, for Pillow >= 12 too: keeping 0 bits gives a black image, as Pillow < 12 did.

    Pillow 12 refuses `bits=0`, which timm's increasing-severity policies (`...-inc1`, FT-CLIP's) draw at the top
    magnitudes, so RandAugment would fail on some samples.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _posterize_guarded(transform: T.Compose) -> T.Compose:
    """The transform with every timm policy op that posterizes calling `posterize` above (this instance only)."""
    for step in transform.transforms:
        ops = list(getattr(step, "ops", []))
        ops += [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]
        for op in ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
    return transform


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """NumPy's global generator seeded for the block (timm draws from it), its state restored afterwards."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class PairMixup:
    """timm's Mixup / CutMix on consecutive pairs of a batch, each pair seeded by (seed, step, global pair index)."""

    def __init__(self, cfg: MixupConfig, num_classes: int, label_smoothing: float, seed: int) -> None:
        self.num_classes, self.smoothing, self.seed = num_classes, label_smoothing, seed
        self.mixup = Mixup(
            mixup_alpha=cfg.mixup_alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            cutmix_minmax=list(cfg.cutmix_minmax) if cfg.cutmix_minmax is not None else None,
            prob=cfg.prob,
            switch_prob=cfg.switch_prob,
            mode="batch",  # a "batch" of two: one lambda per pair
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def pair_seed(self, step: int, pair: int) -> int:
        return random.Random(f"mixup:{self.seed}:{step}:{pair}").getrandbits(32)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, step: int, first: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets [B, C] summing to 1) of a local batch whose first sample is sample `first`
        of the global batch (even). An odd last sample (a batch that lost an image) keeps its own smoothed label."""
        if first % 2:
            raise ValueError(f"mixup pairs must not straddle processes: local batch starts at odd index {first}")
        images = images.clone()
        targets = []
        for j in range(0, len(images) - 1, 2):
            with seeded_numpy(self.pair_seed(step, (first + j) // 2)):
                _, target = self.mixup(images[j : j + 2], labels[j : j + 2])  # mixes the view in place
            targets.append(target)
        if len(images) % 2:
            targets.append(mixup_target(labels[-1:], self.num_classes, 1.0, self.smoothing))
        return images, torch.cat(targets).to(images.dtype)


__all__ = ["PairMixup", "hflip_probability", "seeded_numpy", "train_transform"]
