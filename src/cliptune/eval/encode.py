"""Batched, gradient-free encoding of images and captions: now `cliptune.features`, kept here under its old path.

It moved because training (the locked-tower cache, the zero-shot class head of `loss.name: ce`) and search use it
too, and they must not depend on evaluation code for it. New code imports `cliptune.features`.
"""

from cliptune.features.batches import channels_last, default_workers, model_device
from cliptune.features.encoding import Encoding, encode_images, encode_texts

__all__ = ["Encoding", "channels_last", "default_workers", "encode_images", "encode_texts", "model_device"]
