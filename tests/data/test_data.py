"""Tests of cliptune.data: tables, labelled image sets, images and the torch datasets, on tiny generated PNGs."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliptune.config import TableSpec, ZeroShotSpec
from cliptune.data import (
    CaptionTable,
    DataError,
    ImageFiles,
    Skip,
    TrainPairs,
    collate_skip_none,
    load_rgb,
    read_caption_table,
    read_classification,
)
from cliptune.data.images import is_readable

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "grey": (128, 128, 128)}


def png(path: Path, colour: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def pixel_transform(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


def char_tokenize(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), 16, dtype=torch.long)
    for i, t in enumerate(texts):
        codes = [ord(c) for c in t[:16]]
        out[i, : len(codes)] = torch.tensor(codes)
    return out


def decode(tokens: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in tokens if c)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return {name: png(tmp_path / f"{name}.png", rgb) for name, rgb in COLOURS.items()}


# ---------------------------------------------------------------------------------------------------------------
# Tables


def test_csv_table(tmp_path: Path, images: dict[str, Path]) -> None:
    table = write_csv(tmp_path / "t.csv", [["image", "caption"], ["red.png", "a red square"], ["blue.png", "blue"]])
    result = read_caption_table(TableSpec(path=str(table)))
    assert result.images == [images["red"], images["blue"]]
    assert result.captions == [["a red square"], ["blue"]]
    assert result.name == "t" and result.skipped == [] and result.num_captions == 2 and len(result) == 2


def test_tsv_table_with_custom_keys(tmp_path: Path, images: dict[str, Path]) -> None:
    rows = [["file", "text"], ["green.png", "a green, square thing"], ["grey.png", "grey"]]
    table = write_csv(tmp_path / "t.tsv", rows, delimiter="\t")
    result = read_caption_table(TableSpec(path=str(table), image_key="file", caption_key="text"))
    assert result.images == [images["green"], images["grey"]]
    assert result.captions == [["a green, square thing"], ["grey"]]


def test_jsonl_table_lists_and_blank_lines(tmp_path: Path, images: dict[str, Path]) -> None:
    table = tmp_path / "t.jsonl"
    lines = [
        json.dumps({"image": "red.png", "caption": ["a red one", "red"]}),
        "",
        "  ",
        json.dumps({"image": "blue.png", "caption": "blue"}),
    ]
    table.write_text("\n".join(lines) + "\n")
    result = read_caption_table(TableSpec(path=str(table)))
    assert result.captions == [["a red one", "red"], ["blue"]]


def test_csv_json_list_cell_and_bracketed_caption(tmp_path: Path, images: dict[str, Path]) -> None:
    rows = [["image", "caption"], ["red.png", '["a dog", "a brown dog"]'], ["blue.png", "[photo] a cat"]]
    result = read_caption_table(TableSpec(path=str(write_csv(tmp_path / "t.csv", rows))))
    assert result.captions == [["a dog", "a brown dog"], ["[photo] a cat"]]


def test_repeated_rows_grouped_in_order(tmp_path: Path, images: dict[str, Path], caplog) -> None:
    """Rows of one image merge in order; a repeated (image, caption) row is kept once and counted (issue 11.5)."""
    rows = [
        ["image", "caption"],
        ["red.png", "r1"],
        ["blue.png", "b1"],
        ["red.png", '["r2", "r3"]'],
        ["green.png", "g1"],
        ["blue.png", "b1"],
        ["red.png", "r4"],
    ]
    result = read_caption_table(TableSpec(path=str(write_csv(tmp_path / "t.csv", rows))))
    assert result.images == [images["red"], images["blue"], images["green"]]
    assert result.captions == [["r1", "r2", "r3", "r4"], ["b1"], ["g1"]]
    assert result.num_captions == 6
    assert "1 repeated image-caption rows kept once (first: line 6)" in caplog.text


def test_empty_captions_dropped_and_counted(tmp_path: Path, images: dict[str, Path]) -> None:
    rows = [["image", "caption"], ["red.png", "  "], ["red.png", "red"], ["blue.png", ""], ["green.png", "[]"]]
    result = read_caption_table(TableSpec(path=str(write_csv(tmp_path / "t.csv", rows))))
    assert result.images == [images["red"]] and result.captions == [["red"]]
    assert result.empty_captions == 2 and result.skipped == []


def test_flat(tmp_path: Path, images: dict[str, Path]) -> None:
    table = CaptionTable(images=[images["red"], images["blue"]], captions=[["a", "b"], ["c"]], name="x")
    assert table.flat() == (["a", "b", "c"], [0, 0, 1])


def test_images_root_vs_table_folder(tmp_path: Path) -> None:
    pics = tmp_path / "pics"
    png(pics / "a.png")
    tables = tmp_path / "tables"
    tables.mkdir()
    png(tables / "local.png")
    table = write_csv(tables / "t.csv", [["image", "caption"], ["a.png", "from root"]])
    result = read_caption_table(TableSpec(path=str(table), images_root=str(pics)))
    assert result.images == [pics / "a.png"]
    local = write_csv(tables / "l.csv", [["image", "caption"], ["local.png", "x"], [str(pics / "a.png"), "abs"]])
    result = read_caption_table(TableSpec(path=str(local)))
    assert result.images == [tables / "local.png", pics / "a.png"]


def test_missing_and_corrupt_images_skipped_and_warned(
    tmp_path: Path, images: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png at all")
    rows = [["image", "caption"], ["red.png", "r"], ["gone.png", "g"], ["corrupt.png", "c"], ["blue.png", "b"]]
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        result = read_caption_table(TableSpec(path=str(write_csv(tmp_path / "t.csv", rows))))
    assert result.images == [images["red"], images["blue"]]
    assert result.skipped == [tmp_path / "gone.png", tmp_path / "corrupt.png"]
    warnings = [r for r in caplog.records if r.name == "cliptune.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 4" in warnings[0].getMessage() and "gone.png" in warnings[0].getMessage()


def test_check_images_off_keeps_everything(tmp_path: Path) -> None:
    table = write_csv(tmp_path / "t.csv", [["image", "caption"], ["gone.png", "g"]])
    result = read_caption_table(TableSpec(path=str(table)), check_images=False)
    assert result.images == [tmp_path / "gone.png"] and result.skipped == []


def test_all_missing_raises_naming_file(tmp_path: Path) -> None:
    table = write_csv(tmp_path / "t.csv", [["image", "caption"], ["a.png", "x"], ["b.png", "y"]])
    with pytest.raises(DataError, match=r"t\.csv: 0 of 2 images could be read.*a\.png \(does not exist\)"):
        read_caption_table(TableSpec(path=str(table)))


def test_missing_column_names_existing_columns(tmp_path: Path) -> None:
    table = write_csv(tmp_path / "t.csv", [["file", "text"], ["a.png", "x"]])
    with pytest.raises(DataError) as err:
        read_caption_table(TableSpec(path=str(table)))
    message = str(err.value)
    assert "t.csv" in message and "'image'" in message and "image_key" in message
    assert "'file', 'text'" in message
    with pytest.raises(DataError, match="caption_key"):
        read_caption_table(TableSpec(path=str(table), image_key="file"))


def test_jsonl_missing_key_names_line(tmp_path: Path) -> None:
    table = write_jsonl(tmp_path / "t.jsonl", [{"image": "a.png", "caption": "x"}, {"image": "b.png", "text": "y"}])
    with pytest.raises(DataError, match=r"line 2: no column 'caption'.*'image', 'text'.*caption_key"):
        read_caption_table(TableSpec(path=str(table)))


def test_malformed_jsonl_line_number(tmp_path: Path) -> None:
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "caption": \n')
    with pytest.raises(DataError, match=r"t\.jsonl, line 3: not valid JSON"):
        read_caption_table(TableSpec(path=str(table)))


def test_bad_caption_type_and_empty_image(tmp_path: Path) -> None:
    table = write_jsonl(tmp_path / "t.jsonl", [{"image": "a.png", "caption": ["ok", 3]}])
    with pytest.raises(DataError, match=r"line 1, column 'caption'.*item 1"):
        read_caption_table(TableSpec(path=str(table)))
    csv_table = write_csv(tmp_path / "t.csv", [["image", "caption"], ["", "x"]])
    with pytest.raises(DataError, match=r"line 2, column 'image'.*empty"):
        read_caption_table(TableSpec(path=str(csv_table)))


def test_unknown_suffix_missing_file_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\.csv, \.tsv, \.jsonl"):
        read_caption_table(TableSpec(path=str(tmp_path / "t.parquet")))
    with pytest.raises(DataError, match="does not exist"):
        read_caption_table(TableSpec(path=str(tmp_path / "none.csv")))
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="no data rows"):
        read_caption_table(TableSpec(path=str(tmp_path / "empty.csv")))


def test_bom_csv(tmp_path: Path, images: dict[str, Path]) -> None:
    (tmp_path / "t.csv").write_text("\ufeffimage,caption\nred.png,red\n", encoding="utf-8")
    assert read_caption_table(TableSpec(path=str(tmp_path / "t.csv"))).images == [images["red"]]


# ---------------------------------------------------------------------------------------------------------------
# Images


def test_load_rgb_composites_transparency_on_white(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    image = load_rgb(tmp_path / "clear.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    palette.save(tmp_path / "pal.png", transparency=0)
    assert load_rgb(tmp_path / "pal.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(png(tmp_path / "r.png")).getpixel((0, 0)) == (255, 0, 0)


def test_is_readable(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    assert is_readable(png(tmp_path / "ok.png"))
    assert not is_readable(tmp_path / "bad.png")
    assert not is_readable(tmp_path / "missing.png")
    assert not is_readable(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def five_caption_table(tmp_path: Path) -> CaptionTable:
    caps = [f"caption {k}" for k in range(5)]
    paths = [png(tmp_path / f"{i}.png", (i * 40, 0, 0)) for i in range(3)]
    return CaptionTable(images=paths, captions=[caps, caps, ["only one"]], name="five")


def test_train_pairs_deterministic_captions(tmp_path: Path) -> None:
    table = five_caption_table(tmp_path)
    a = TrainPairs(table, pixel_transform, char_tokenize, seed=3)
    b = TrainPairs(table, pixel_transform, char_tokenize, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    # Access in different orders: the draw depends only on (seed, epoch, index).
    first = [decode(a[i][1]) for i in range(3)]
    second = [decode(b[i][1]) for i in reversed(range(3))][::-1]
    assert first == second and first[2] == "only one"
    image, tokens = a[1]
    assert image.tolist() == [40.0, 0.0, 0.0] and tokens.shape == (16,)
    drawn = {a.caption(0, epoch=e) for e in range(20)}
    assert len(drawn) > 1 and drawn <= set(table.captions[0])
    seeds = {TrainPairs(table, pixel_transform, char_tokenize, seed=s).caption(0) for s in range(20)}
    assert len(seeds) > 1


def test_train_pairs_vanished_image_and_collate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = five_caption_table(tmp_path)
    table.images[1].unlink()
    pairs = TrainPairs(table, pixel_transform, char_tokenize, seed=0)
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        batch = [pairs[i] for i in range(3)] + [pairs[1]]
    assert isinstance(batch[1], Skip) and batch[1] == batch[3] and batch[1].name == str(table.images[1])
    assert pairs.failed == {table.images[1]} and pairs.skipped == 2
    assert sum("1.png" in r.getMessage() for r in caplog.records) == 1  # logged once per path
    collated = collate_skip_none(batch)
    images, tokens = collated
    assert images.shape == (2, 3) and tokens.shape == (2, 16) and collated.skipped == (batch[1], batch[3])
    assert not collate_skip_none([batch[1], batch[3]]) and collate_skip_none([batch[1]]).skipped == (batch[1],)
    loader = torch.utils.data.DataLoader(pairs, batch_size=3, collate_fn=collate_skip_none)
    assert next(iter(loader))[0].shape[0] == 2


def test_image_files(tmp_path: Path) -> None:
    red = png(tmp_path / "red.png")
    files = ImageFiles([red, Image.new("RGB", (2, 2), (0, 9, 0))], pixel_transform)
    assert len(files) == 2 and files[0].tolist() == [255.0, 0.0, 0.0] and files[1].tolist() == [0.0, 9.0, 0.0]
    with pytest.raises(DataError, match=r"gone\.png"):
        ImageFiles([tmp_path / "gone.png"], pixel_transform)[0]


# ---------------------------------------------------------------------------------------------------------------
# Classification


def test_classification_from_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "set"
    png(root / "golden_retriever" / "b.png")
    png(root / "golden_retriever" / "nested" / "a.PNG")
    png(root / "cat" / "x.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        result = read_classification(ZeroShotSpec(path=str(root)))
    assert result.classnames == ["cat", "empty class", "golden retriever"]
    assert result.labels == [0, 2, 2]
    assert result.paths[0] == root / "cat" / "x.png" and result.name == "set"
    assert any("empty_class" in r.getMessage() for r in caplog.records)
    renamed = read_classification(ZeroShotSpec(path=str(root), classnames=["kitty", "none", "dog"]))
    assert renamed.classnames == ["kitty", "none", "dog"]
    with pytest.raises(DataError, match="2 names but there are 3 class folders"):
        read_classification(ZeroShotSpec(path=str(root), classnames=["a", "b"]))


def test_classification_folder_skips_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    png(tmp_path / "a" / "ok.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bad.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        result = read_classification(ZeroShotSpec(path=str(tmp_path)))
    assert result.paths == [tmp_path / "a" / "ok.png"] and result.skipped == [tmp_path / "b" / "bad.png"]
    assert any("skipped 1 of 2" in r.getMessage() for r in caplog.records)


def test_classification_list_int_labels(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "with space.png")
    png(tmp_path / "imgs" / "b.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# path label\n\nimgs/with space.png   1\nimgs/b.png\t0\n")
    result = read_classification(ZeroShotSpec(path=str(listing), classnames=["zero", "one"]))
    assert result.paths == [tmp_path / "imgs" / "with space.png", tmp_path / "imgs" / "b.png"]
    assert result.labels == [1, 0] and result.classnames == ["zero", "one"]
    with pytest.raises(DataError, match="at least 2 names"):
        read_classification(ZeroShotSpec(path=str(listing), classnames=["zero"]))
    default = read_classification(ZeroShotSpec(path=str(listing)))
    assert default.classnames == ["0", "1"]


def test_classification_list_string_labels_and_images_root(tmp_path: Path) -> None:
    pics = tmp_path / "pics"
    png(pics / "a.png")
    png(pics / "b.png")
    png(pics / "c.png")
    listing = tmp_path / "meta" / "list.txt"
    listing.parent.mkdir()
    listing.write_text("a.png zebra\nb.png ant\nc.png zebra\n")
    result = read_classification(ZeroShotSpec(path=str(listing), images_root=str(pics)))
    assert result.classnames == ["ant", "zebra"] and result.labels == [1, 0, 1]
    assert result.name == "list"
    renamed = read_classification(ZeroShotSpec(path=str(listing), images_root=str(pics), classnames=["Ant", "Z"]))
    assert renamed.classnames == ["Ant", "Z"]
    with pytest.raises(DataError, match="2 distinct labels"):
        read_classification(ZeroShotSpec(path=str(listing), images_root=str(pics), classnames=["x"]))


def test_classification_list_errors(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\n\nlonely_path_without_label\n")
    with pytest.raises(DataError, match=r"list\.txt, line 3: expected `path label`"):
        read_classification(ZeroShotSpec(path=str(listing)))
    listing.write_text("a.png 0\nb.png cat\n")
    with pytest.raises(DataError, match=r"mix integers \(line 1.*line 2"):
        read_classification(ZeroShotSpec(path=str(listing)))
    listing.write_text("a.png 0\nb.png 1\n")
    with pytest.raises(DataError, match="0 of 2 images could be read"):
        read_classification(ZeroShotSpec(path=str(listing), classnames=["a", "b"]))
    with pytest.raises(DataError, match="does not exist"):
        read_classification(ZeroShotSpec(path=str(tmp_path / "nowhere")))


def test_list_file_with_tabs_allows_spaces_in_class_names(tmp_path: Path) -> None:
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png", (0, 0, 255))
    (tmp_path / "list.txt").write_text(f"{a.name}\tsigns and symbols\n{b.name}\tfood\n")
    data = read_classification(ZeroShotSpec(path=str(tmp_path / "list.txt")))
    assert data.classnames == ["food", "signs and symbols"] and data.labels == [1, 0]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16), [0, 100, 128, 255]),  # 16-bit PNG
        (np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), [0, 64, 128, 255]),  # float TIFF in [0, 1]
        (np.array([[0, 10, 100, 255]], dtype=np.int32), [0, 10, 100, 255]),  # 32-bit integer holding 8-bit values
    ],
)
def test_wide_greyscale_images_are_scaled_to_8_bits(tmp_path: Path, array: np.ndarray, expected: list[int]) -> None:
    """Issue 11.5: PIL's own conversion clips 16-bit / float / 32-bit images to black and white."""
    from PIL import Image

    from cliptune.data.images import load_rgb

    path = tmp_path / ("x.png" if array.dtype == np.uint16 else "x.tiff")
    Image.fromarray(array).save(path)
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == expected and (rgb[..., 0] == rgb[..., 2]).all()
