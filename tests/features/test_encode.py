"""Batched encoding: captions sorted by length and channels-last images give what one-at-a-time encoding gives."""

import os
from pathlib import Path

import torch

from cliptune.config import TowerConfig
from cliptune.features import Encoding, channels_last, default_workers
from cliptune.models import build_model
from tests.helpers import CAPTIONS, tiny_config


def test_sorted_caption_batches_return_in_input_order(bert_dir: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(bert_dir)).eval()
    texts = [*CAPTIONS, "a", *reversed(CAPTIONS), "the small green square with a dog"] * 3
    batched = Encoding(model, batch_size=2).texts(texts)
    with torch.no_grad():  # one caption at a time: no batching, no sorting, no padding beyond its own
        alone = torch.cat([model.encode_text(model.tokenize([t])) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)


def test_channels_last_images_equal_and_layout_restored(bert_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    image = TowerConfig(source="timm", name="test_efficientnet", pretrained=False)
    model = build_model(tiny_config(bert_dir, image=image)).eval()
    pixels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    with torch.no_grad():
        plain = model.encode_image(pixels)
        with channels_last(model, images=True) as layout:
            assert layout == torch.channels_last and conv.is_contiguous(memory_format=torch.channels_last)
            converted = model.encode_image(pixels.contiguous(memory_format=layout))
    torch.testing.assert_close(converted, plain, atol=1e-5, rtol=0)
    assert conv.is_contiguous()  # back to the model's own layout for training


def test_images_are_decoded_in_workers_only_for_sets_over_four_batches(monkeypatch):
    """Worker start-up costs more than it saves on a few batches (`benchmarks/search.py`, search-encoding)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert default_workers(4 * 64, 64) == 0
    assert default_workers(4 * 64 + 1, 64) == 4  # at most 4 decoders
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_workers(1000, 64) == 2
