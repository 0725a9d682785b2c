"""Compositionality evaluation: does the model score an image's true caption above its hard negatives?

The SugarCrepe / ARO form: each sample is an image, its true caption and one or more false captions (swapped,
replaced or shuffled words); the score is the percentage of samples whose true caption has the highest image-text
cosine similarity. Samples come from a table (CSV, TSV, JSONL, or a JSON list or dict of records such as SugarCrepe's
files), or are built offline from any image-caption table with `build_compositionality_table`:

    python -m cliptune.eval.compositionality build --data val.csv --out val_negatives.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cliptune.config import TableSpec
from cliptune.data import CaptionTable, DataError, read_caption_table
from cliptune.data.images import describe_unreadable, log_skipped, readable_mask
from cliptune.data.negatives import KINDS, LEXICONS, TAGGERS, NegativeGenerator
from cliptune.features.encoding import Encoding

logger = logging.getLogger("cliptune.data")

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class CompositionalityTable:
    """Samples of (image, true caption, false captions); an image may appear in several samples."""

    name: str
    images: list[Path]
    positives: list[str]
    negatives: list[list[str]]
    skipped: int = 0  # samples dropped because their image is missing or unreadable
    unreadable: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.positives) == len(self.negatives):
            raise ValueError(
                f"CompositionalityTable {self.name!r}: {len(self.images)} images, {len(self.positives)} true "
                f"captions and {len(self.negatives)} negative lists; they must match"
            )
        if any(not negs for negs in self.negatives):
            raise ValueError(f"CompositionalityTable {self.name!r}: every sample needs at least one false caption")

    def __len__(self) -> int:
        return len(self.images)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_compositionality(encoding: Encoding, table: CompositionalityTable) -> dict[str, float]:
    """`accuracy`: percent of samples whose true caption outscores every false one; `samples`: how many.

    Scores are image-text cosine similarities. A tie with a false caption counts as a failure, as a model that
    cannot tell the two captions apart has not ranked the true one first (a false caption identical to the true one
    always ties). Each distinct image and caption is encoded once.
    """
    if not len(table):
        raise ValueError(f"compositionality table {table.name!r} has no samples to evaluate")
    images = list(dict.fromkeys(table.images))
    texts = list(dict.fromkeys([*table.positives, *(n for negs in table.negatives for n in negs)]))
    encoding.report_overflow(texts, f"compositionality set {table.name!r}")
    image_emb, text_emb = encoding.images(images), encoding.texts(texts)
    image_row, text_row = {p: i for i, p in enumerate(images)}, {t: i for i, t in enumerate(texts)}
    sample_images = torch.tensor([image_row[p] for p in table.images])
    positive = torch.tensor([text_row[t] for t in table.positives])
    owner = torch.tensor([i for i, negs in enumerate(table.negatives) for _ in negs])
    negative = torch.tensor([text_row[n] for negs in table.negatives for n in negs])
    correct = ranked_first(
        (image_emb[sample_images] * text_emb[positive]).sum(-1),
        (image_emb[sample_images[owner]] * text_emb[negative]).sum(-1),
        owner,
    )
    return {"accuracy": 100.0 * int(correct.sum()) / len(table), "samples": len(table)}


def ranked_first(positive: torch.Tensor, negative: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Per sample, whether its positive score is strictly above all its negative scores (`owner[j]`: sample of j)."""
    best = torch.full_like(positive, float("-inf")).scatter_reduce(0, owner, negative, reduce="amax")
    return positive > best


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Columns:
    image: str
    caption: str
    negatives: str

    def missing(self, key: str, where: str, present: list[str]) -> DataError:
        parameter, holds = {
            self.image: ("image_key", "image paths"),
            self.caption: ("caption_key", "true captions"),
            self.negatives: ("negatives_key", "false captions"),
        }[key]
        names = ", ".join(repr(c) for c in present) or "(none)"
        return DataError(
            f"{where}: no column {key!r}; the columns are {names}. "
            f"Set `{parameter}` of this eval.compositionality set to the column that holds the {holds}"
        )


# One sample as read: (image path as written, true caption, false captions).
_Sample = tuple[str, str, list[str]]


def read_compositionality_table(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "caption",
    negatives_column: str = "negatives",
    root: str | Path | None = None,
    name: str | None = None,
) -> CompositionalityTable:
    """Read a table of (image, true caption, false captions); samples whose image cannot be read are skipped.

    False captions are a JSON list (`["a cat on a dog", "a dog under a cat"]`) or one `|`-separated string. Image
    paths are relative to `root`, by default the table's folder. A SugarCrepe file reads with
    `image_column="filename", negatives_column="negative_caption", root=<COCO val2017 folder>`.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported table format {path.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{path}: compositionality table does not exist; check its path")
    columns = _Columns(image_column, caption_column, negatives_column)
    samples = list(_read_samples(path, columns))
    if not samples:
        raise DataError(
            f"{path}: the table has no rows; add rows with {image_column!r}, {caption_column!r}, {negatives_column!r}"
        )
    base = Path(root).expanduser() if root is not None else path.parent
    images = [_resolve(base, image) for image, _, _ in samples]
    unique = list(dict.fromkeys(images))
    readable = dict(zip(unique, readable_mask(unique)))
    bad = [p for p in unique if not readable[p]]
    if len(bad) == len(unique):
        raise DataError(
            f"{path}: 0 of {len(unique)} images could be read; first: {describe_unreadable(bad[0])}. Relative image "
            f"paths are resolved against {base}; pass `root` if they live elsewhere"
        )
    log_skipped(path, bad, len(unique))
    keep = [i for i, image in enumerate(images) if readable[image]]
    return CompositionalityTable(
        name=name or path.stem,
        images=[images[i] for i in keep],
        positives=[samples[i][1] for i in keep],
        negatives=[samples[i][2] for i in keep],
        skipped=len(samples) - len(keep),
        unreadable=bad,
    )


def _resolve(base: Path, image: str) -> Path:
    image_path = Path(image).expanduser()
    return image_path if image_path.is_absolute() else base / image_path


def _read_samples(path: Path, columns: _Columns) -> Iterator[_Sample]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _read_delimited(path, columns, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, columns)
    else:
        yield from _read_json(path, columns)


def _read_delimited(path: Path, columns: _Columns, delimiter: str) -> Iterator[_Sample]:
    # utf-8-sig: a spreadsheet's byte-order mark would otherwise become part of the first column's name
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = list(reader.fieldnames or [])
        if not header:
            raise DataError(f"{path}: the file is empty; the first line must be a header naming the columns")
        for key in (columns.image, columns.caption, columns.negatives):
            if key not in header:
                raise columns.missing(key, str(path), header)
        for record in reader:
            yield _sample(record, f"{path}, line {reader.line_num}", columns)


def _read_jsonl(path: Path, columns: _Columns) -> Iterator[_Sample]:
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
                ) from None
            yield _checked_record(record, where, columns)


def _read_json(path: Path, columns: _Columns) -> Iterator[_Sample]:
    """A JSON list of records, or a dict of id -> record (SugarCrepe's layout)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        items = [(f"{path}, record {key!r}", record) for key, record in data.items()]
    elif isinstance(data, list):
        items = [(f"{path}, record {i}", record) for i, record in enumerate(data)]
    else:
        raise DataError(f"{path}: expected a JSON list of records or a dict of id -> record, got {type(data).__name__}")
    for where, record in items:
        yield _checked_record(record, where, columns)


def _checked_record(record: Any, where: str, columns: _Columns) -> _Sample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in (columns.image, columns.caption, columns.negatives):
        if key not in record:
            raise columns.missing(key, where, list(record))
    return _sample(record, where, columns)


def _sample(record: dict[str, Any], where: str, columns: _Columns) -> _Sample:
    image, caption = record.get(columns.image), record.get(columns.caption)
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}, column {columns.image!r}: the image path is missing or empty; fill it in")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}, column {columns.caption!r}: the true caption is missing or empty; fill it in")
    negatives = _negatives_cell(record.get(columns.negatives), f"{where}, column {columns.negatives!r}")
    return image.strip(), caption.strip(), negatives


def _negatives_cell(value: Any, where: str) -> list[str]:
    """False captions from a JSON list (parsed or as text) or a `|`-separated string."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: looks like a JSON list but is not valid JSON ({e.msg}); write "
                '["first false caption", "second"] or separate the captions with |'
            ) from None
    if isinstance(value, str):
        value = value.split("|")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: expected a list of false captions (strings), got {value!r}")
    negatives = [v.strip() for v in value if v.strip()]
    if not negatives:
        raise DataError(f"{where}: no false caption; give at least one, as a JSON list or separated by |")
    return negatives


# ---------------------------------------------------------------------------------------------------------------
# Building a table from an image-caption set


def build_compositionality_table(
    table: CaptionTable,
    out: Path,
    generator: NegativeGenerator,
    count: int = 3,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
) -> Path:
    """Write a JSONL table (image, caption, negatives) with up to `count` generated negatives of each image's first
    caption; `kinds` overrides the generator's. Images whose caption admits no negative are left out (logged).
    Image paths are written relative to the output's folder where they lie under it, so the two move together."""
    out = Path(out)
    if kinds is not None:
        generator = replace(generator, kinds=tuple(kinds))
    captions = [caps[0] for caps in table.captions]
    negatives = generator.negatives_for(captions, count, seed)
    rows = [
        {"image": _portable(image, out.parent), "caption": caption, "negatives": negs}
        for image, caption, negs in zip(table.images, captions, negatives)
        if negs
    ]
    if not rows:
        raise DataError(
            f"{table.name or 'the table'}: none of its {len(captions)} captions admits a hard negative of kinds "
            f"{', '.join(generator.kinds)}; use longer captions or more kinds"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if len(rows) < len(captions):
        logger.warning(
            "%s: %d of %d captions admit no hard negative; left out", out, len(captions) - len(rows), len(captions)
        )
    logger.info("%s: %d samples, negatives by %s", out, len(rows), generator.describe())
    return out


def _portable(image: Path, folder: Path) -> str:
    resolved, base = image.resolve(), folder.resolve()
    return resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(image)


def main(argv: list[str] | None = None) -> int:
    """`python -m cliptune.eval.compositionality build --data TABLE --out FILE.jsonl`."""
    parser = argparse.ArgumentParser(
        prog="python -m cliptune.eval.compositionality", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write a compositionality table with generated hard negatives")
    build.add_argument("--data", required=True, help="image-caption table (.csv/.tsv/.jsonl/.json)")
    build.add_argument("--out", required=True, help="output .jsonl file")
    build.add_argument("--count", type=int, default=3, help="negatives per caption (at most)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--tagger", choices=TAGGERS, default="auto")
    build.add_argument("--lexicon", choices=LEXICONS, default="auto")
    build.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    build.add_argument("--image-key", default="image")
    build.add_argument("--caption-key", default="caption")
    build.add_argument("--images-root", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = TableSpec(
            path=args.data, image_key=args.image_key, caption_key=args.caption_key, images_root=args.images_root
        )
        generator = NegativeGenerator(kinds=tuple(args.kinds), tagger=args.tagger, lexicon=args.lexicon)
        out = build_compositionality_table(read_caption_table(spec), Path(args.out), generator, args.count, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
