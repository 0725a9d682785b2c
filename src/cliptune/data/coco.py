"""MS-COCO caption annotations as caption-table rows: COCO's own `captions_*.json` and Karpathy's `dataset_coco.json`.

`read_caption_table` sends every `.json` table here and does the rest (grouping, empty captions, image checks) as
for any other table. The format is told from the content, not the file name, because both come under many names.
"""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cliptune.config import TableSpec
from cliptune.data.errors import DataError

logger = logging.getLogger("cliptune.data")

# The canonical order of Karpathy's splits, used to list them in messages; other split names are listed after.
KARPATHY_SPLITS = ("train", "restval", "val", "test")

# One image: (its index in the file's `images` list, image path as written, its captions).
Row = tuple[int, str, list[str]]


def read_coco_rows(path: Path, spec: TableSpec) -> list[Row]:
    """One row per entry of the file's `images`, in file order; `spec.split` selects Karpathy splits."""
    with _gc_paused():
        return _rows(path, spec)  # the parsed file is freed as _rows returns, before the collector runs again


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing dataset_coco.json builds millions of small dicts and lists (no cycles among them); the cyclic
    collector would walk them over and over while they are made: 4-5 s of CPU instead of 1 s for 123k images."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rows(path: Path, spec: TableSpec) -> list[Row]:
    data = _load(path)
    if "annotations" in data:
        return _coco_rows(path, data, spec.split)
    if _looks_karpathy(data["images"]):
        return _karpathy_rows(path, data["images"], spec.split)
    raise DataError(
        f"{path}: not an MS-COCO caption file: it has `images` but neither COCO's `annotations` nor Karpathy's "
        "per-image `sentences`. Use captions_train2017.json / captions_val2017.json or dataset_coco.json"
    )


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is this really a JSON file?") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(
            f"{path}: expected a JSON object with an `images` list (MS-COCO captions_*.json or Karpathy's "
            "dataset_coco.json); .jsonl is the format for one image-caption record per line"
        )
    if not data["images"]:
        raise DataError(f"{path}: the `images` list is empty")
    return data


def _looks_karpathy(images: list[Any]) -> bool:
    first = images[0]
    return isinstance(first, dict) and "sentences" in first


def _bad_entry(path: Path, where: str, entry: Any, needs: str) -> DataError:
    shown = sorted(entry) if isinstance(entry, dict) else f"a {type(entry).__name__}"
    return DataError(f"{path}: {where} is not a valid entry ({shown}); it needs {needs}")


# ---------------------------------------------------------------------------------------------------------------
# COCO's own format: images [{id, file_name}], annotations [{image_id, caption}], one file per split


def _coco_rows(path: Path, data: dict[str, Any], split: str | None) -> list[Row]:
    if split is not None:
        raise DataError(
            f"{path}: `split: {split}` applies to Karpathy's dataset_coco.json only; this file is in COCO's own "
            "captions format, where the file itself is the split (captions_train2017.json, captions_val2017.json): "
            "remove `split` from this data set"
        )
    captions = _captions_by_image(path, data["annotations"])
    rows = []
    for index, entry in enumerate(data["images"]):
        try:
            # pop: a repeated image entry gets no second copy of its captions, and what is left over has no image
            file_name, texts = entry["file_name"], captions.pop(entry["id"], [])
        except (KeyError, TypeError):
            raise _bad_entry(path, f"images[{index}]", entry, "`id` and `file_name`") from None
        if not isinstance(file_name, str) or not file_name.strip():
            raise _bad_entry(path, f"images[{index}]", entry, "a non-empty `file_name` string")
        rows.append((index, file_name.strip(), texts))
    if captions:
        orphans = sum(len(c) for c in captions.values())
        logger.warning("%s: ignored %d captions of %d image ids missing from `images`", path, orphans, len(captions))
    return rows


def _captions_by_image(path: Path, annotations: Any) -> dict[Any, list[str]]:
    if not isinstance(annotations, list) or not annotations:
        raise DataError(f"{path}: `annotations` is empty or not a list; this file holds no captions")
    first = annotations[0]
    if isinstance(first, dict) and "caption" not in first:
        raise DataError(
            f"{path}: its annotations have no `caption` ({sorted(first)}): this is not a captions file "
            "(instances_*.json and person_keypoints_*.json hold boxes); use captions_train2017.json or "
            "captions_val2017.json"
        )
    captions: dict[Any, list[str]] = {}
    for index, ann in enumerate(annotations):
        try:
            text = ann["caption"].strip()
            image_id = ann["image_id"]
        except (KeyError, TypeError, AttributeError):
            raise _bad_entry(path, f"annotations[{index}]", ann, "`image_id` and a `caption` string") from None
        bucket = captions.setdefault(image_id, [])
        if text:
            bucket.append(text)
    return captions


# ---------------------------------------------------------------------------------------------------------------
# Karpathy's format: images [{filepath, filename, split, sentences: [{raw}]}], all splits in one file


def _karpathy_rows(path: Path, images: list[Any], split: str | None) -> list[Row]:
    wanted = set(_checked_split(path, images, split))
    rows = []
    for index, entry in enumerate(images):
        try:
            if entry["split"] not in wanted:
                continue
            filename, folder = entry["filename"], entry.get("filepath")
            texts = [s["raw"].strip() for s in entry["sentences"]]
        except (KeyError, TypeError, AttributeError):
            raise _bad_entry(path, f"images[{index}]", entry, "`filename`, `split` and `sentences: [{raw}]`") from None
        if not isinstance(filename, str) or not filename.strip():
            raise _bad_entry(path, f"images[{index}]", entry, "a non-empty `filename` string")
        # Flickr30k's Karpathy file has no `filepath`: its images sit directly in the images folder.
        image = f"{folder}/{filename.strip()}" if folder else filename.strip()
        rows.append((index, image, [t for t in texts if t]))
    return rows


def _checked_split(path: Path, images: list[Any], split: str | None) -> list[str]:
    counts = Counter(e.get("split") for e in images if isinstance(e, dict) and isinstance(e.get("split"), str))
    present = [s for s in KARPATHY_SPLITS if s in counts] + sorted(set(counts) - set(KARPATHY_SPLITS))
    listing = ", ".join(f"{s} ({counts[s]} images)" for s in present)
    if split is None:
        raise DataError(
            f"{path}: a Karpathy-split file holds several splits; set `split` of this data set to one of: {listing}, "
            "or join them with '+' (train+restval is the usual training set, test the 5k test set)"
        )
    parts = list(dict.fromkeys(p.strip() for p in split.split("+")))  # in order, without repeats
    if not all(parts):
        raise DataError(f"{path}: split {split!r} has an empty part; join split names with '+', e.g. train+restval")
    unknown = [p for p in parts if p not in counts]
    if unknown:
        raise DataError(
            f"{path}: split {', '.join(repr(u) for u in unknown)} is not in this file; its splits are: {listing} "
            "(join several with '+', e.g. train+restval)"
        )
    return parts
