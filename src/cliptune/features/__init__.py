"""Running a model over many inputs without gradients, shared by training, evaluation and search.

`batches` runs a tower over batched images or captions (eval mode, autocast, channels-last convolutions);
`encoding` gives normalised embeddings (what evaluation and search use); `prompts` builds class embeddings from
prompt templates (zero-shot evaluation, and the initial class head of `loss.name: ce`); `trunk_cache` remembers
what a locked tower's trunk produced for each input, so each image or caption goes through it once per run,
whether training or evaluation asks first; `store` keeps those outputs on disk across runs.
Nothing here imports `losses/`, `eval/` or `train/`: they import it.
"""

from cliptune.features.batches import BatchRunner, channels_last, default_workers, model_device
from cliptune.features.encoding import Encoding, encode_images, encode_texts
from cliptune.features.store import FeatureStore, input_key, tower_fingerprint
from cliptune.features.trunk_cache import TrunkCache, can_cache

__all__ = [
    "BatchRunner",
    "Encoding",
    "FeatureStore",
    "TrunkCache",
    "can_cache",
    "channels_last",
    "default_workers",
    "encode_images",
    "encode_texts",
    "input_key",
    "model_device",
    "tower_fingerprint",
]
