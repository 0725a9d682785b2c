"""What an index covers: the images of a folder, caption table, list file or tar shards, as items to encode.

An item is one image with its captions. Its bytes live in `file`, whole, or (for a tar shard member) at
`offset`..`offset + length`; its change key is `file`'s (size, mtime), so `cliptune index --add` re-encodes an
image whose file changed and nothing else.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cliptune.config import TableSpec
from cliptune.data import DataError, read_caption_table
from cliptune.data.classification import IMAGE_SUFFIXES, image_files
from cliptune.data.images import log_skipped
from cliptune.data.shards import MANIFEST
from cliptune.data.tables import SUPPORTED_SUFFIXES as TABLE_SUFFIXES

LIST_SUFFIXES = (".txt", ".lst")


@dataclass(frozen=True)
class Item:
    """One image to index: `path` names it (a file, or `shard.tar#key`), `file` holds its bytes."""

    path: str
    file: Path
    captions: tuple[str, ...] = ()
    offset: int = -1  # -1: the whole file
    length: int = -1
    size: int = 0
    mtime_ns: int = 0


@dataclass
class Source:
    """The items of a source and the folders its files may be read from (nothing outside them is opened)."""

    items: list[Item]
    roots: list[Path]
    skipped: list[str] = field(default_factory=list)


def inside(path: str | Path, roots: Collection[Path]) -> bool:
    """True if `path`, with links resolved, lies inside one of `roots` (resolved folders; pass a set when many)."""
    allowed = roots if isinstance(roots, (set, frozenset)) else set(roots)
    return any(parent in allowed for parent in Path(path).resolve().parents)


def covering(folders: set[Path]) -> list[Path]:
    """The fewest folders that hold all of `folders`: those with no other one above them."""
    return sorted(f for f in folders if not any(parent in folders for parent in f.parents))


def open_item(item: Item, roots: Collection[Path]) -> Image.Image:
    """The item's image, opened lazily (call `.load()` after checking its size); only files inside `roots`."""
    if not inside(item.file, roots):
        raise DataError(f"{item.file}: outside the folders this index was built from; not read")
    if item.offset < 0:
        return Image.open(item.file)
    with open(item.file, "rb") as f:
        f.seek(item.offset)
        data = f.read(item.length)
    return Image.open(io.BytesIO(data))


def read_source(source: str | Path) -> Source:
    """Items of a folder (recursive), a caption table, a list file (one image path per line) or tar shards."""
    path = Path(source).expanduser()
    text = str(source)
    if path.is_dir() and (path / MANIFEST).is_file():
        return _shards(path, sorted(path.glob("*.tar")))
    if path.is_dir():
        return _with_stat(path, [(p, ()) for p in image_files(path)])
    if path.suffix == ".tar" or (".tar" in text and "{" in text):
        import webdataset as wds  # expands brace patterns the way `cliptune shards` readers do

        urls = [Path(u) for u in wds.shardlists.expand_urls(text)]
        return _shards(urls[0].parent if urls else path.parent, urls)
    if not path.is_file():
        raise DataError(
            f"{path}: does not exist; --images takes a folder of images, a caption table "
            f"({', '.join(TABLE_SUFFIXES)}), a list file ({', '.join(LIST_SUFFIXES)}) or tar shards"
        )
    if path.suffix.lower() in TABLE_SUFFIXES:
        table = read_caption_table(TableSpec(path=str(path)), check_images=False)
        return _with_stat(path, [(p, tuple(c)) for p, c in zip(table.images, table.captions)])
    if path.suffix.lower() in LIST_SUFFIXES:
        return _with_stat(path, [(p, ()) for p in _list_file(path)])
    raise DataError(
        f"{path}: unsupported source {path.suffix!r}; use a folder, a caption table ({', '.join(TABLE_SUFFIXES)}), "
        f"a list file ({', '.join(LIST_SUFFIXES)}), or tar shards (.tar, a brace pattern, or a folder with {MANIFEST})"
    )


def _list_file(path: Path) -> list[Path]:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise DataError(f"{path}: the list file names no images; write one image path per line")
    return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]


def _with_stat(source: Path, entries: list[tuple[Path, tuple[str, ...]]]) -> Source:
    """Items for image files, stat'ed; missing files are skipped, counted and named.

    The index records the folders its files are in (links resolved); nothing outside them is ever read through it.
    """
    if not entries:
        raise DataError(f"{source}: no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) found")
    items, skipped, folders = [], [], set()
    # absolute paths: a resumed or `--add` build run from another folder must see the same items
    for file, captions in {Path(absolute(p)): c for p, c in entries}.items():
        try:
            stat = file.stat()
        except OSError:
            skipped.append(f"{file} (does not exist)")
            continue
        items.append(Item(str(file), file, captions, size=stat.st_size, mtime_ns=stat.st_mtime_ns))
        folders.add(file.resolve().parent)
    if not items:
        raise DataError(f"{source}: none of its {len(entries)} images can be indexed; first: {skipped[0]}")
    log_skipped(source, skipped, len(entries))
    return Source(items, covering(folders), skipped)


def _shards(root: Path, shards: list[Path]) -> Source:
    if not shards:
        raise DataError(f"{root}: no .tar shards found; write them with `cliptune shards`")
    items = []
    for shard in shards:
        if not shard.is_file():
            raise DataError(f"{shard}: shard file does not exist; check the path or brace pattern")
        items += _shard_items(shard)
    if not items:
        raise DataError(f"{root}: the shards hold no images ({' '.join(sorted(IMAGE_SUFFIXES))})")
    return Source(items, covering({s.resolve().parent for s in shards}))


def _shard_items(shard: Path) -> list[Item]:
    """One item per image member, with its sample's captions; its bytes are read in place by offset.

    webdataset streams samples in order; an index needs one image again by id (thumbnails), so the members'
    offsets are taken from the tar headers here instead.
    """
    shard = Path(absolute(shard))
    stat = shard.stat()
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, tuple[str, ...]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if member.isfile() and f".{ext.lower()}" in IMAGE_SUFFIXES:
                images.setdefault(key, member)
            elif member.isfile() and ext == "json":
                meta = json.load(tar.extractfile(member))
                captions[key] = tuple(meta.get("captions", ()))
    return [
        Item(f"{shard}#{key}", shard, captions.get(key, ()), m.offset_data, m.size, stat.st_size, stat.st_mtime_ns)
        for key, m in images.items()
    ]


def file_key(item: Item) -> tuple[str, int, int]:
    """What says an item changed: its path and its file's size and modification time."""
    return (item.path, item.size, item.mtime_ns)


def absolute(path: str | Path) -> str:
    return os.path.abspath(Path(path).expanduser())
