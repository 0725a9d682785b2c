"""Batched, gradient-free runs of a model's towers over images or captions, in eval mode and the run's precision."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from cliptune.data import ImageFiles
from cliptune.models.base import ClipModel
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

    On CPU, channels-last convolutions are faster (EfficientNet-Lite0: 1.6x here, `benchmarks/search.py`) and equal
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


@dataclass
class BatchRunner:
    """Runs functions of `model` over batches of its inputs: no gradients, eval mode, float32 CPU outputs."""

    model: ClipModel
    precision: str = "fp32"
    batch_size: int = 64
    workers: int = 0
    progress: bool = False

    @torch.no_grad()
    def run(
        self, fn: Callable[[torch.Tensor], torch.Tensor], batches: Sequence | DataLoader, desc: str | None
    ) -> torch.Tensor:
        """`fn` over every batch (images decoded by a DataLoader, or token tensors), concatenated in order."""
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

    def image_batches(self, items: Sequence[ImageItem]) -> DataLoader:
        dataset = ImageFiles(list(items), self.model.eval_transform)
        workers = self.workers or default_workers(len(items), self.batch_size)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=workers)

    def text_batches(self, texts: Sequence[str]) -> list[torch.Tensor]:
        size = self.batch_size * 4  # text is far cheaper than images per item
        return [self.model.tokenize(list(texts[i : i + size])) for i in range(0, len(texts), size)]

    def run_images(
        self, fn: Callable[[torch.Tensor], torch.Tensor], items: Sequence[ImageItem], desc: str
    ) -> torch.Tensor:
        return self.run(fn, self.image_batches(items), desc)

    def run_texts(self, fn: Callable[[torch.Tensor], torch.Tensor], texts: Sequence[str], desc: str) -> torch.Tensor:
        """`fn` over captions batched in order of length, returned in input order.

        Text towers stop at their batch's longest caption; batches of similar lengths leave them little padding.
        """
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = self.run(fn, self.text_batches([texts[i] for i in order]), desc)
        return out[torch.argsort(torch.tensor(order))]
