"""MS-COCO caption files: COCO's own captions_*.json and Karpathy's dataset_coco.json, on tiny generated PNGs."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from cliptune.config import TableSpec
from cliptune.data import DataError, read_caption_table


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return path


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def read(path: Path, split: str | None = None, images_root: Path | None = None, check_images: bool = True):
    root = str(images_root) if images_root else None
    return read_caption_table(TableSpec(path=str(path), split=split, images_root=root), check_images=check_images)


# ---------------------------------------------------------------------------------------------------------------
# COCO's own format


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """coco/annotations/captions_val2017.json and coco/val2017/ with 3 images listed, 2 present on disk."""
    for name in ("000000000001.jpg", "000000000002.jpg"):
        png(tmp_path / "coco" / "val2017" / name)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 4, "width": 4} for i in (2, 1, 3)]
    annotations = [
        {"id": 10, "image_id": 1, "caption": "A red square.\n"},
        {"id": 11, "image_id": 2, "caption": "Another red square."},
        {"id": 12, "image_id": 1, "caption": "  a small red tile "},
        {"id": 13, "image_id": 3, "caption": "missing on disk"},
        {"id": 14, "image_id": 1, "caption": "   "},
    ]
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    return write_json(tmp_path / "coco" / "annotations" / "captions_val2017.json", data)


def test_coco_format_groups_captions_per_image_and_skips_missing(coco: Path, caplog) -> None:
    root = coco.parents[1] / "val2017"
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        table = read(coco, images_root=root)
    # `images` order; every caption of an image, stripped, empty ones dropped
    assert table.images == [root / "000000000002.jpg", root / "000000000001.jpg"]
    assert table.captions == [["Another red square."], ["A red square.", "a small red tile"]]
    assert table.skipped == [root / "000000000003.jpg"] and table.name == "captions_val2017"
    assert "skipped 1 of 3 images" in caplog.text
    texts, text_to_image = table.flat()
    assert texts[1:] == ["A red square.", "a small red tile"] and text_to_image == [0, 1, 1]


def test_coco_format_without_image_check_and_orphan_captions(tmp_path: Path, caplog) -> None:
    data = {
        "images": [{"id": 5, "file_name": "a.jpg"}, {"id": 6, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 5, "caption": "x"},
            {"image_id": 99, "caption": "no such image"},
            {"image_id": 5, "caption": "y"},
        ],
    }
    path = write_json(tmp_path / "captions_train2017.json", data)
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        table = read(path, check_images=False)
    assert table.images == [tmp_path / "a.jpg"] and table.captions == [["x", "y"]] and table.empty_captions == 1
    assert "ignored 1 captions of 1 image ids missing from `images`" in caplog.text
    assert "skipped 1 images whose captions are all empty" in caplog.text


def test_coco_format_rejects_a_split(coco: Path) -> None:
    with pytest.raises(ValueError, match=r"`split: test` applies to Karpathy's dataset_coco.json only"):
        read(coco, split="test", images_root=coco.parents[1] / "val2017")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([1, 2], r"expected a JSON object with an `images` list"),
        ({"images": []}, r"the `images` list is empty"),
        ({"images": [{"id": 1}]}, r"neither COCO's `annotations` nor Karpathy's"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}, r"`annotations` is empty"),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]},
            r"annotations have no `caption`.*instances_\*\.json",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 7}]},
            r"annotations\[0\] is not a valid entry",
        ),
        ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "c"}]}, r"images\[0\].*`file_name`"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path: Path, data: object, expected: str) -> None:
    path = write_json(tmp_path / "c.json", data)
    with pytest.raises(DataError, match=expected):
        read(path, check_images=False)
    assert gc.isenabled()  # the reader pauses the cyclic collector while parsing, and must turn it back on


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"c\.json: not valid JSON"):
        read(path)


# ---------------------------------------------------------------------------------------------------------------
# Karpathy's format


def sentences(*texts: str) -> list[dict[str, object]]:
    return [{"tokens": t.lower().split(), "raw": t, "imgid": 0, "sentid": 0} for t in texts]


@pytest.fixture
def karpathy(tmp_path: Path) -> Path:
    """coco/dataset_coco.json over coco/train2014 and coco/val2014; one test image is missing on disk."""
    entries = [
        ("val2014", "v1.jpg", "test", ["a test cat. ", "a cat"]),
        ("train2014", "t1.jpg", "train", ["a train dog"]),
        ("val2014", "v2.jpg", "restval", ["a restval bird", "  ", "a bird"]),
        ("val2014", "v3.jpg", "val", ["a val fish"]),
        ("val2014", "v4.jpg", "test", ["gone"]),
        ("train2014", "t2.jpg", "train", ["a second dog"]),
    ]
    images = []
    for i, (folder, name, split, texts) in enumerate(entries):
        if name != "v4.jpg":
            png(tmp_path / "coco" / folder / name)
        entry = {"filepath": folder, "filename": name, "split": split, "imgid": i, "cocoid": i}
        images.append({**entry, "sentences": sentences(*texts)})
    return write_json(tmp_path / "coco" / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_karpathy_split_selection(karpathy: Path) -> None:
    root = karpathy.parent
    train = read(karpathy, split="train")
    assert train.images == [root / "train2014" / "t1.jpg", root / "train2014" / "t2.jpg"]
    assert train.captions == [["a train dog"], ["a second dog"]]
    val = read(karpathy, split="val")
    assert val.images == [root / "val2014" / "v3.jpg"] and val.captions == [["a val fish"]]


def test_karpathy_train_plus_restval_keeps_file_order(karpathy: Path) -> None:
    root = karpathy.parent
    table = read(karpathy, split=" train + restval ")
    assert table.images == [root / "train2014" / "t1.jpg", root / "val2014" / "v2.jpg", root / "train2014" / "t2.jpg"]
    assert table.captions[1] == ["a restval bird", "a bird"]  # the blank sentence is dropped
    assert read(karpathy, split="restval+train").images == table.images


def test_karpathy_test_split_skips_missing_images(karpathy: Path, caplog) -> None:
    root = karpathy.parent
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        table = read(karpathy, split="test")
    assert table.images == [root / "val2014" / "v1.jpg"] and table.captions == [["a test cat.", "a cat"]]
    assert table.skipped == [root / "val2014" / "v4.jpg"]
    assert "skipped 1 of 2 images" in caplog.text and "v4.jpg" in caplog.text


def test_karpathy_images_root_and_no_filepath(tmp_path: Path, karpathy: Path) -> None:
    moved = tmp_path / "elsewhere"
    karpathy.parent.rename(moved)
    json_file = moved / "dataset_coco.json"
    assert read(json_file, split="val", images_root=moved).images == [moved / "val2014" / "v3.jpg"]
    # Flickr30k's Karpathy file names images without a folder
    flickr = write_json(
        tmp_path / "dataset_flickr30k.json",
        {"images": [{"filename": "f.jpg", "split": "test", "sentences": sentences("a flickr photo")}]},
    )
    assert read(flickr, split="test", check_images=False).images == [tmp_path / "f.jpg"]


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        (None, r"set `split` of this data set to one of: train \(2 images\), restval \(1 images\), val \(1 images\), "),
        ("tset", r"split 'tset' is not in this file; its splits are: train \(2 images\), restval .*test \(2 images\)"),
        ("train+dev", r"split 'dev' is not in this file"),
        ("train+", r"split 'train\+' has an empty part"),
    ],
)
def test_karpathy_missing_or_unknown_split(karpathy: Path, split: str | None, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        read(karpathy, split=split)


def test_karpathy_malformed_entry(tmp_path: Path) -> None:
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": sentences("ok")},
        {"filepath": "val2014", "filename": "b.jpg", "split": "test", "sentences": [{"tokens": ["no", "raw"]}]},
    ]
    path = write_json(tmp_path / "dataset_coco.json", {"images": images})
    with pytest.raises(DataError, match=r"images\[1\] is not a valid entry.*`sentences: \[\{raw\}\]`"):
        read(path, split="test", check_images=False)


def test_end_to_end_through_table_spec(karpathy: Path) -> None:
    """What a config's `data.train` / `eval.retrieval` entry does: TableSpec(path, split, images_root)."""
    spec = TableSpec(path=str(karpathy), split="train+restval", images_root=str(karpathy.parent), name="coco-train")
    table = read_caption_table(spec)
    assert len(table) == 3 and table.num_captions == 4 and table.name == "coco-train" and table.skipped == []
    assert TableSpec(path=str(karpathy)).name == "dataset_coco"
