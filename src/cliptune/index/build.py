"""Building an index: encode a source's images in atomically written chunks, then write the table and faiss index.

A build killed at any point is continued by running the same command again: chunks already on disk are kept and
only the images they do not hold are encoded. `--add` is the same step on a finished index: unchanged images
(same path, size and mtime) keep their embeddings, new and changed ones are encoded, deleted ones are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cliptune.data import DataError
from cliptune.data.images import log_skipped, to_rgb
from cliptune.features import (
    BatchRunner,
    FeatureStore,
    TrunkCache,
    channels_last,
    default_workers,
    input_key,
    model_device,
)
from cliptune.index import ann, store
from cliptune.index.sources import Item, Source, file_key, open_item, read_source
from cliptune.models import ClipModel
from cliptune.utils.files import atomic_write
from cliptune.utils.precision import autocast

logger = logging.getLogger("cliptune.index")

INFO, BUILDING, ITEMS, VECTORS, CHUNKS = "index.json", "building.json", "items.parquet", "vectors.faiss", "chunks"
FORMAT = 1


def read_json(path: Path, needs: tuple[str, ...]) -> dict[str, Any]:
    """index.json or building.json, checked: a damaged file is named, never a KeyError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as JSON ({e}); rebuild the index into a new folder") from e
    missing = [key for key in needs if not isinstance(data, dict) or key not in data]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; it was not written by `cliptune index`, or damaged")
    if data.get("format", FORMAT) != FORMAT:
        raise DataError(f"{path}: index format {data['format']}, this cliptune reads {FORMAT}; rebuild the index")
    return data


def read_info(folder: Path) -> dict[str, Any]:
    return read_json(folder / INFO, ("format", "model", "count", "dim", "roots", "ann"))


def model_identity(model: ClipModel, name: str) -> dict[str, Any]:
    """What a query must match: the model's architecture spec and a digest of every weight and buffer."""
    digest = hashlib.sha1(json.dumps(model.spec(), sort_keys=True, default=str).encode())
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(model.eval_transform).encode())
    return {"name": name, "fingerprint": digest.hexdigest()[:24], "spec": model.spec()}


def check_model(expected: dict[str, Any], model: dict[str, Any], where: Path) -> None:
    if expected["fingerprint"] != model["fingerprint"]:
        raise DataError(
            f"{where}: built with model {expected['name']!r} (fingerprint {expected['fingerprint']}), but the model "
            f"given is {model['name']!r} (fingerprint {model['fingerprint']}); embeddings of two models cannot be "
            "compared. Use the index's own model, or build a new index (another --out) with this one"
        )


class Trunks:
    """Image trunk outputs shared with training runs through their feature cache (`runtime.feature_cache`).

    A run with a locked image tower has already sent its images through the trunk; an index of the same images with
    the run's model (or any model with the same trunk weights and transform: the store is keyed by their
    fingerprint, and by each file's path, size and mtime) then only applies the head. Images new to the store are
    encoded as usual and added to it.
    """

    def __init__(self, model: ClipModel, folder: str | Path, precision: str) -> None:
        self.model = model
        self.cache = TrunkCache(BatchRunner(model, precision), ["image"], FeatureStore(folder))
        self.memo = self.cache.memo["image"]
        self.added = 0

    @staticmethod
    def key(item: Item) -> str | None:
        return input_key(item.file, "image") if item.offset < 0 else None  # tar members are not cached

    def embed(
        self,
        keys: Sequence[str | None],
        stored: Sequence[bool],
        pixels: torch.Tensor | None,
        layout: torch.memory_format,
    ) -> torch.Tensor:
        """Unnormalised embeddings: stored trunk outputs, or the trunk over `pixels` (the other items, in order)."""
        device = model_device(self.model)
        fresh: Iterator[torch.Tensor] = iter(())
        if pixels is not None:
            fresh = iter(self.model.trunk("image", pixels.to(device, memory_format=layout)).float().cpu())
        rows = []
        for key, known in zip(keys, stored):
            row = self.memo[key] if known else next(fresh)
            if key is not None and not known:
                self.memo[key], self.added = row, self.added + 1
            rows.append(row)
        return self.model.head("image", torch.stack(rows).to(device))

    def save(self) -> None:
        if self.added:
            self.cache.save("image")


class _Images(Dataset):
    """(pixels, width, height) per item, or None for an image that cannot be read (skipped and named).

    Items in `stored` only need their size: their trunk outputs are known, so no pixels (an empty tensor).
    """

    def __init__(self, items: Sequence[Item], roots: list[Path], transform: Any, stored: frozenset[int]) -> None:
        self.items, self.roots, self.transform, self.stored = list(items), frozenset(roots), transform, stored

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int, int] | tuple[int, None, int, int]:
        try:
            with open_item(self.items[index], self.roots) as image:
                if index in self.stored:  # the header gives the size; nothing is decoded
                    return index, torch.empty(0), image.width, image.height
                image.load()
                rgb = to_rgb(image)
            return index, self.transform(rgb), rgb.width, rgb.height
        except Exception:
            return index, None, 0, 0


def _collate(batch: list[tuple]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, int]], list[int]]:
    ok = [b for b in batch if b[1] is not None]
    failed = [b[0] for b in batch if b[1] is None]
    decoded = [b[1] for b in ok if b[1].numel()]
    pixels = torch.stack(decoded) if decoded else None
    return [b[0] for b in ok], pixels, [(b[2], b[3]) for b in ok], failed


def encode_chunks(
    model: ClipModel,
    todo: Sequence[Item],
    roots: list[Path],
    out: Path,
    batch_size: int,
    workers: int | None,
    chunk_size: int,
    precision: str = "fp32",
    trunks: Trunks | None = None,
) -> list[str]:
    """Encode `todo` into chunk files under `out/chunks`; returns the paths of images that could not be read."""
    keys: list[str | None] = []
    stored: frozenset[int] = frozenset()
    if trunks is not None:  # each file's key (a stat) once: for the lookup here and the embedding later
        keys = [trunks.key(item) for item in todo]
        stored = frozenset(i for i, key in enumerate(keys) if key in trunks.memo)
        logger.info("%d of the images' trunk outputs are in the feature cache", len(stored))
    workers = default_workers(len(todo) - len(stored), batch_size) if workers is None else workers
    loader = DataLoader(
        _Images(todo, roots, model.eval_transform, stored),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    failed: list[str] = []
    pending: list[tuple[list[int], list[tuple[int, int]], np.ndarray]] = []
    device = model_device(model)
    bar = tqdm(total=len(todo), unit="img", desc="indexing images", smoothing=0.1)
    with bar, channels_last(model, images=True) as layout:
        for ids, pixels, sizes, bad in loader:
            failed += [todo[i].path for i in bad]
            if ids:
                with torch.no_grad(), autocast(device, precision):
                    if trunks is not None:
                        emb = trunks.embed([keys[i] for i in ids], [i in stored for i in ids], pixels, layout).float()
                    else:
                        emb = model.encode_image(pixels.to(device, memory_format=layout)).float()
                pending.append((ids, sizes, torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()))
            if sum(len(p[0]) for p in pending) >= chunk_size:
                _write_chunk(out, todo, pending)
                pending = []
            bar.update(len(ids) + len(bad))
    if pending:
        _write_chunk(out, todo, pending)
    if trunks is not None:
        trunks.save()
    return failed


def _write_chunk(out: Path, todo: Sequence[Item], pending: list) -> None:
    folder = out / CHUNKS
    folder.mkdir(parents=True, exist_ok=True)
    number = max((int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.parquet")), default=-1) + 1
    ids = [i for p in pending for i in p[0]]
    sizes = [s for p in pending for s in p[1]]
    table = store.to_table([todo[i] for i in ids], sizes, np.concatenate([p[2] for p in pending]))
    store.write(table, folder / f"chunk-{number:06d}.parquet")


def _encoded(out: Path) -> Iterator[pa.Table]:
    """Every table already encoded for this index: the finished one (for --add), then chunks in order."""
    if (out / ITEMS).is_file():
        yield store.read(out / ITEMS)
    yield from (store.read(p) for p in sorted((out / CHUNKS).glob("chunk-*.parquet")))


def _done_keys(out: Path) -> set[tuple[str, int, int]]:
    return {file_key(item) for table in _encoded(out) for item in store.items(table)}


def _final_table(out: Path, source: Source) -> pa.Table:
    """The rows of the source's items, in source order, each from the table that last encoded it."""
    tables = list(_encoded(out))
    starts = np.cumsum([0] + [t.num_rows for t in tables])
    where: dict[tuple[str, int, int], int] = {}
    for t, table in enumerate(tables):
        for row, item in enumerate(store.items(table)):
            where[file_key(item)] = int(starts[t]) + row
    picks = [where[file_key(item)] for item in source.items if file_key(item) in where]
    if not picks:
        raise DataError(f"{out}: no image of the source could be encoded")
    return pa.concat_tables(tables).take(pa.array(picks, type=pa.int64())).combine_chunks()


def _start(out: Path, identity: dict[str, Any], add: bool) -> None:
    """Refuse what would mix models or overwrite a finished index; record the model of a build in progress."""
    if (out / INFO).is_file():
        if not add:
            raise DataError(
                f"{out}: an index is already there; pass --add to update it with new, changed and deleted images, "
                "or choose another --out"
            )
        check_model(read_info(out)["model"], identity, out)
    elif out.exists() and not (out / BUILDING).is_file() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not an index; choose an empty or new folder for --out")
    if (out / BUILDING).is_file():
        check_model(read_json(out / BUILDING, ("model",))["model"], identity, out / BUILDING)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / BUILDING) as tmp:
        tmp.write_text(json.dumps({"model": identity}, indent=2))


def _finish(out: Path, source: Source, identity: dict[str, Any], skipped: list[str], exact_max: int) -> dict:
    table = _final_table(out, source)
    vectors = store.embeddings(table)
    index, info = ann.build(vectors, exact_max=exact_max)
    store.write(table, out / ITEMS)
    ann.write(index, out / VECTORS)
    meta = {
        "format": FORMAT,
        "model": identity,
        "count": table.num_rows,
        "dim": int(vectors.shape[1]),
        "roots": [str(r) for r in source.roots],
        "ann": info.to_dict(),
        "skipped": len(skipped),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_write(out / INFO) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out / CHUNKS, ignore_errors=True)
    (out / BUILDING).unlink(missing_ok=True)
    return meta


def build_index(
    model: ClipModel,
    model_name: str,
    images: str | Path,
    out: str | Path,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    add: bool = False,
    exact_max: int = ann.EXACT_MAX,
    chunk_size: int = 1024,
    feature_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Build, continue or (`add`) update the index at `out` over `images`; returns index.json's content.

    `feature_cache`: a training run's locked-tower store (`runtime.feature_cache`), for models whose image tower
    splits into trunk and head: images already there skip the trunk, new ones are added to it.
    """
    out = Path(out).expanduser()
    identity = model_identity(model, model_name)
    source = read_source(images)
    _start(out, identity, add)
    done = _done_keys(out)
    todo = [item for item in source.items if file_key(item) not in done]
    logger.info(
        "%s: %d images, %d already encoded, %d to encode",
        out,
        len(source.items),
        len(source.items) - len(todo),
        len(todo),
    )
    model.eval()
    trunks = Trunks(model, feature_cache, "fp32") if feature_cache and model.has_trunk("image") else None
    if feature_cache and trunks is None:
        logger.info("%s: the model's image tower has no separate trunk; --feature-cache is not used", feature_cache)
    chunk = max(chunk_size, batch_size)
    failed = encode_chunks(model, todo, source.roots, out, batch_size, workers, chunk, trunks=trunks)
    log_skipped(Path(str(images)), failed, len(source.items))
    return _finish(out, source, identity, source.skipped + failed, exact_max)
