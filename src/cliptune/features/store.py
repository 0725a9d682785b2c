"""An on-disk store of locked-tower outputs, so repeated runs over the same data skip the frozen towers entirely.

Entries are keyed by a fingerprint of the tower (its weights and buffers, and the image transform or the
tokenizer) and by the input (caption text, or image path with its size and modification time), so a changed
tower, transform or file is simply a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cliptune.models.base import ClipModel, Tower
from cliptune.utils.files import atomic_write, remove_stale_temporaries


def tower_fingerprint(model: ClipModel, tower: Tower, precision: str = "fp32") -> str:
    """Names what a tower computes: its weights, its image transform or tokenizer, and a precision other than fp32
    (bf16 outputs are not fp32 outputs)."""
    digest = hashlib.sha1(tower.encode() if precision == "fp32" else f"{tower}:{precision}".encode())
    for module in model.tower_modules(tower):
        for name, value in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if tower == "image":
        digest.update(repr(model.eval_transform).encode())
    else:
        digest.update(str(model.tokenize(["fingerprint of a tokenizer: 0123 ÄÖ"]).tolist()).encode())
    return digest.hexdigest()[:20]


def input_key(item: str | Path, tower: Tower) -> str:
    if tower == "text":
        return f"t:{item}"
    stat = os.stat(item)  # a file rewritten in place gets a new key
    return f"i:{Path(item).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class FeatureStore:
    """One safetensors file (+ JSON keys) per tower fingerprint under `folder`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    def _paths(self, fingerprint: str) -> tuple[Path, Path]:
        return self.folder / f"{fingerprint}.safetensors", self.folder / f"{fingerprint}.keys.json"

    def load(self, fingerprint: str) -> dict[str, torch.Tensor]:
        tensors, keys = self._paths(fingerprint)
        if not (tensors.is_file() and keys.is_file()):
            return {}
        rows = load_file(str(tensors))["features"]
        names = json.loads(keys.read_text())
        if len(names) != len(rows):  # a store from an interrupted write: ignore it, it will be rewritten
            return {}
        return dict(zip(names, rows))

    def save(self, fingerprint: str, entries: dict[str, torch.Tensor]) -> None:
        if not entries:
            return
        tensors, keys = self._paths(fingerprint)
        self.folder.mkdir(parents=True, exist_ok=True)
        names = list(entries)
        remove_stale_temporaries(self.folder, recursive=False)  # several runs share a store: only dead writers'
        with atomic_write(tensors) as tmp:
            save_file({"features": torch.stack([entries[k] for k in names]).contiguous()}, str(tmp))
        with atomic_write(keys) as tmp:
            tmp.write_text(json.dumps(names))
