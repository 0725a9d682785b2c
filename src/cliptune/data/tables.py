"""Reading image-caption tables (CSV, TSV, JSONL, COCO / Karpathy JSON) into unique images with all their captions."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliptune.config import TableSpec
from cliptune.data.coco import read_coco_rows
from cliptune.data.errors import DataError
from cliptune.data.images import describe_unreadable, log_outside_root, log_skipped, readable_mask

logger = logging.getLogger("cliptune.data")

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")

# One data row: (line number in the file, image path as written, captions of that row).
_Row = tuple[int, str, list[str]]


@dataclass
class CaptionTable:
    """Unique, usable images in first-appearance order, each with one or more captions."""

    images: list[Path]
    captions: list[list[str]]
    skipped: list[Path] = field(default_factory=list)
    name: str = ""
    empty_captions: int = 0  # images dropped because none of their captions had any text
    # caption -> the hard-negative captions the table gives for it (TableSpec.negatives_key), if it has that column
    negatives: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise ValueError(f"CaptionTable {self.name!r}: {len(self.images)} images but {len(self.captions)} lists")
        if any(not caps for caps in self.captions):
            raise ValueError(f"CaptionTable {self.name!r}: every image needs at least one caption")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return sum(len(caps) for caps in self.captions)

    def flat(self) -> tuple[list[str], list[int]]:
        """All captions in image order, and for each caption the index of its image (text-to-image targets)."""
        texts = [c for caps in self.captions for c in caps]
        text_to_image = [i for i, caps in enumerate(self.captions) for _ in caps]
        return texts, text_to_image


def read_caption_table(spec: TableSpec, check_images: bool = True) -> CaptionTable:
    """Read the table `spec.path`; with `check_images`, missing or unreadable images are skipped and warned about."""
    path = Path(spec.path).expanduser()
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported table format {path.suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: table file does not exist; check the `path` of this data set")
    rows = _read_rows(path, spec)
    if not rows:
        raise DataError(
            f"{path}: the table has no data rows; add rows with columns {spec.image_key!r}, {spec.caption_key!r}"
        )
    base = Path(spec.images_root).expanduser() if spec.images_root else path.parent
    grouped = _group(path, rows, base)
    with_text = {img: caps for img, caps in grouped.items() if caps}
    empty = len(grouped) - len(with_text)
    if not with_text:
        raise DataError(
            f"{path}: all {len(grouped)} images have only empty captions in column "
            f"{spec.caption_key!r}; check `caption_key` or fill in the captions"
        )
    if empty:
        logger.warning("%s: skipped %d images whose captions are all empty", path, empty)
    images = list(with_text)
    log_outside_root(path, images, base)
    skipped: list[Path] = []
    if check_images:
        images, skipped = _split_readable(path, images, base)
    return CaptionTable(
        images=images,
        captions=[with_text[p] for p in images],
        skipped=skipped,
        name=spec.name,
        empty_captions=empty,
        negatives=read_negatives(path, spec) if spec.negatives_key else None,
    )


def read_negatives(path: Path, spec: TableSpec) -> dict[str, list[str]]:
    """caption -> hard negatives from column `spec.negatives_key` (a JSON list, or `|`-separated text, per row).

    Every caption of a row gets that row's negatives; a row with an empty cell gives none (its captions are then
    trained without hard negatives: they are masked out of the loss).
    """
    key = spec.negatives_key
    assert key is not None
    if path.suffix.lower() == ".json":
        raise DataError(f"{path}: negatives_key {key!r} applies to CSV, TSV and JSONL tables, not COCO JSON")
    out: dict[str, list[str]] = {}
    for where, record in _records(path, spec):
        if key not in record:
            raise DataError(
                f"{where}: no column {key!r} (negatives_key); the columns are {', '.join(map(repr, record))}"
            )
        negatives = _negative_cell(record[key], where, key)
        captions = record.get(spec.caption_key)
        captions = (
            _json_captions(captions, where, spec.caption_key)
            if not isinstance(captions, str)
            else (_text_cell(captions, where, spec.caption_key))
        )
        for caption in captions:
            out.setdefault(caption, []).extend(n for n in negatives if n not in out.get(caption, []))
    return out


def _records(path: Path, spec: TableSpec) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) of every data row of a CSV / TSV / JSONL table (already validated by the main reader)."""
    text = _text_of(path)
    if path.suffix.lower() == ".jsonl":
        lines = enumerate(text.split("\n"), start=1)
        return [(f"{path}, line {n}", json.loads(line)) for n, line in lines if line.strip()]
    delimiter = _delimiter(path, text.split("\n", 1)[0], "\t" if path.suffix.lower() == ".tsv" else ",", spec)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    return [(f"{path}, line {reader.line_num}", dict(record)) for record in reader]


def _negative_cell(value: Any, where: str, key: str) -> list[str]:
    if isinstance(value, list):
        return _json_captions(value, where, key)
    text = (value or "").strip() if isinstance(value, str) or value is None else None
    if text is None:
        raise DataError(f"{where}, column {key!r}: expected a list of captions or text, got {value!r}")
    listed = _text_cell(text, where, key)
    if len(listed) == 1 and listed[0] == text and "|" in text:
        return [part.strip() for part in text.split("|") if part.strip()]
    return listed


def _split_readable(path: Path, images: list[Path], base: Path) -> tuple[list[Path], list[Path]]:
    """(readable, skipped) images; a DataError if none can be read, since a set with no images is useless."""
    mask = readable_mask(images)
    good = [p for p, ok in zip(images, mask) if ok]
    bad = [p for p, ok in zip(images, mask) if not ok]
    if not good:
        raise DataError(
            f"{path}: 0 of {len(images)} images could be read; first: {describe_unreadable(bad[0])}. "
            f"Relative image paths are resolved against {base}; set `images_root` if they live elsewhere"
        )
    log_skipped(path, bad, len(images))
    return good, bad


def _group(path: Path, rows: list[_Row], base: Path) -> dict[Path, list[str]]:
    """Captions of repeated rows of one image merged, in order; dict order is first appearance.

    `a/../a/x.jpg` and `a/x.jpg` are one image (normalised, not resolved: a link stays a name of its own); a caption
    repeated for one image is kept once. Both are counted and named: duplicates distort recall.
    """
    grouped: dict[Path, list[str]] = {}
    spellings: dict[Path, set[str]] = {}
    repeated: list[int] = []
    for line, image, captions in rows:
        image_path = Path(image).expanduser()
        if not image_path.is_absolute():
            image_path = base / image_path
        image_path = Path(os.path.normpath(image_path))
        spellings.setdefault(image_path, set()).add(image)
        known = grouped.setdefault(image_path, [])
        repeated += [line for c in captions if c in known]
        known.extend(c for c in captions if c not in known)
    merged = [names for names in spellings.values() if len(names) > 1]
    if merged:
        first = sorted(merged[0])
        logger.warning("%s: %d images appear under several spellings, merged (first: %s)", path, len(merged), first)
    if repeated:
        count, first_line = len(repeated), repeated[0]
        logger.warning("%s: %d repeated image-caption rows kept once (first: line %d)", path, count, first_line)
    return grouped


def _text_of(path: Path) -> str:
    """The table's text; a file that is not UTF-8 (or holds NUL bytes) is named with the byte offset and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would otherwise end up in the
        # first column's name, and then `image` would not be found.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}, line {line}); save the table as UTF-8") from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise DataError(f"{path}, line {line}: a NUL byte; the file is binary or damaged, repair that line")
    return text


def _delimiter(path: Path, header: str, delimiter: str, spec: TableSpec) -> str:
    """The table's delimiter: the one its suffix says, unless the header only splits on another (`;` exports)."""
    if spec.image_key in header.split(delimiter):
        return delimiter
    try:
        found = csv.Sniffer().sniff(header, delimiters=",;\t|").delimiter
    except csv.Error:
        return delimiter
    if found != delimiter and spec.image_key in header.split(found):
        logger.warning("%s: columns are separated by %r, not %r; reading it that way", path, found, delimiter)
        return found
    return delimiter


def _read_rows(path: Path, spec: TableSpec) -> list[_Row]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_coco_rows(path, spec)
    if suffix == ".jsonl":
        return _read_jsonl(path, spec)
    return _read_delimited(path, spec, "\t" if suffix == ".tsv" else ",")


def _missing_column(path: Path, key: str, config_key: str, present: list[str], where: str = "") -> DataError:
    columns = ", ".join(repr(c) for c in present) or "(none)"
    return DataError(
        f"{path}{where}: no column {key!r}; the columns are {columns}. "
        f"Set `{config_key}` of this data set to the column that holds the "
        f"{'image paths' if config_key == 'image_key' else 'captions'}"
    )


def _read_delimited(path: Path, spec: TableSpec, delimiter: str) -> list[_Row]:
    text = _text_of(path)
    delimiter = _delimiter(path, text.split("\n", 1)[0], delimiter, spec)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = list(reader.fieldnames or [])
        if not header:
            raise DataError(f"{path}: the file is empty; the first line must be a header naming the columns")
        for key, config_key in ((spec.image_key, "image_key"), (spec.caption_key, "caption_key")):
            if key not in header:
                raise _missing_column(path, key, config_key, header)
        rows, extra, multiline = [], [], []
        for record in reader:
            where = f"{path}, line {reader.line_num}"
            image = _image_cell(record.get(spec.image_key), where, spec.image_key)
            captions = _text_cell(record.get(spec.caption_key), where, spec.caption_key)
            extra += [reader.line_num] if record.get(None) else []  # cells beyond the header's columns
            multiline += [reader.line_num] if any("\n" in c for c in captions) else []
            rows.append((reader.line_num, image, captions))
    except csv.Error as e:
        raise DataError(
            f"{path}, line {reader.line_num}: {e}; a quote that is never closed makes the rest of the file one "
            "field: close or remove it"
        ) from None
    _warn_rows(path, extra, "have more cells than the header has columns; the extra cells are ignored")
    _warn_rows(path, multiline, "have a caption spanning several lines; a stray quote may have merged rows")
    return rows


def _warn_rows(path: Path, lines: list[int], what: str) -> None:
    if lines:
        shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
        logger.warning("%s: %d rows %s (lines %s)", path, len(lines), what, shown)


def _read_jsonl(path: Path, spec: TableSpec) -> list[_Row]:
    rows = []
    for line_no, line in enumerate(_text_of(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                f'JSON object such as {{"{spec.image_key}": ..., "{spec.caption_key}": ...}}'
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key, config_key in ((spec.image_key, "image_key"), (spec.caption_key, "caption_key")):
            if key not in record:
                raise _missing_column(path, key, config_key, list(record), where=f", line {line_no}")
        image = _image_cell(record[spec.image_key], where, spec.image_key)
        rows.append((line_no, image, _json_captions(record[spec.caption_key], where, spec.caption_key)))
    return rows


def _image_cell(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}, column {key!r}: the image path is {kind}; it must be a path string")
    if not value.strip():
        raise DataError(f"{where}, column {key!r}: the image path is empty; fill it in or delete the row")
    return value.strip()


def _text_cell(value: str | None, where: str, key: str) -> list[str]:
    """Captions of a CSV/TSV cell: one caption, or a JSON list of strings such as `["a dog", "a brown dog"]`."""
    text = (value or "").strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None  # a caption that merely looks bracketed, e.g. "[photo] a dog", stays as written
        if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
            return [c.strip() for c in parsed if c.strip()]
    return [text] if text else []


def _json_captions(value: Any, where: str, key: str) -> list[str]:
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise DataError(
                    f"{where}, column {key!r}: caption list item {i} is {type(item).__name__} "
                    f"{item!r}; every caption must be a string"
                )
        return [c.strip() for c in value if c.strip()]
    if value is None:
        return []
    raise DataError(
        f"{where}, column {key!r}: expected a caption string or a list of strings, got {type(value).__name__} {value!r}"
    )
