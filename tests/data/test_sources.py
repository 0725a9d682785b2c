"""Tests for cliptune.data.sources on tiny fake package trees shaped like the real Debian/npm files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cliptune.data import sources
from cliptune.data.sources import DataPackageMissingError, build_emoji, build_openclipart, common, emoji, openclipart

# The real openclipart-svg metadata: a cc:Work whose agents (creator, publisher) carry dc:title elements of their own.
_SVG = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="100" height="50">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        {title}
        <dc:description>{description}</dc:description>
        <dc:subject>
          <rdf:Bag>{keywords}</rdf:Bag>
        </dc:subject>
        <dc:creator><cc:Agent><dc:title>Jane Artist</dc:title></cc:Agent></dc:creator>
        <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org/"><dc:title>Jane Artist</dc:title></cc:Agent>
        </dc:publisher>
        <dc:format>image/svg+xml</dc:format>
      </cc:Work>
    </rdf:RDF>
  </metadata>
</svg>
"""

# rel path -> (title or None, description, keywords)
_CLIPART = {
    "animals/red_fox_jane_artist_01": ("Red Fox", "A red fox sitting in the grass", ["fox", "hash", "", "animal"]),
    "animals/mammals/blue_whale_02": ("blue_whale_02", "", ["whale", "animal"]),
    "animals/untitled_01": (None, "", ["animal"]),
    "food/green_apple_01": ("Green Apple Jane Artist", "", ["fruit", "apple"]),
    "food/fruit/banana_03": ("Banana", "jane.artist@example.org", []),
}
_RED, _BLUE = (200, 30, 30), (30, 30, 200)


def _fake_png(path: Path, palette: bool) -> None:
    """A 40x40 page of transparent *black* with a red and a blue square inside the box (5, 5, 35, 25)."""
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (10, 10), (*_RED, 255)), (5, 5))
    im.paste(Image.new("RGBA", (10, 10), (*_BLUE, 255)), (25, 15))
    if palette:  # palette + tRNS, as 2,730 of the real PNGs are
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        transparent = im.getpixel((0, 0))
        im.save(path, transparency=transparent)
    else:
        im.save(path)


def _fake_openclipart(root: Path) -> Path:
    for i, (rel, (title, description, keywords)) in enumerate(_CLIPART.items()):
        png, svg = root / "png" / f"{rel}.png", root / "svg" / f"{rel}.svg"
        png.parent.mkdir(parents=True, exist_ok=True)
        svg.parent.mkdir(parents=True, exist_ok=True)
        _fake_png(png, palette=i % 2 == 1)
        svg.write_text(
            _SVG.format(
                title=f"<dc:title>{title}</dc:title>" if title else "",
                description=description,
                keywords="".join(f"<rdf:li>{k}</rdf:li>" if k else "<rdf:li/>" for k in keywords),
            ),
            encoding="utf-8",
        )
    # The real tree files one picture under several folders through symlinks; it must count once.
    (root / "png/food/fox_alias.png").symlink_to(
        os.path.relpath(root / "png/animals/red_fox_jane_artist_01.png", root / "png/food")
    )
    (root / "svg/food/fox_alias.svg").symlink_to(
        os.path.relpath(root / "svg/animals/red_fox_jane_artist_01.svg", root / "svg/food")
    )
    return root


def _close(pixel: tuple[int, ...], colour: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 12 for a, b in zip(pixel, colour))


def _read_table(path: Path) -> dict[str, list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return {row["image"]: json.loads(row["caption"]) for row in csv.DictReader(f)}


@pytest.fixture
def clipart_root(tmp_path: Path) -> Path:
    return _fake_openclipart(tmp_path / "openclipart")


def test_openclipart_captions_and_images(clipart_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = build_openclipart(out, image_size=32, val_fraction=0.5, root=clipart_root)
    rows = _read_table(paths["train"]) | _read_table(paths["val"])
    by_title = {caps[0]: caps for caps in rows.values()}
    # Untitled image skipped; the symlinked alias is not a second image.
    assert sorted(by_title) == ["Banana", "Green Apple", "Red Fox", "blue whale"]
    assert by_title["Red Fox"] == [
        "Red Fox",
        "Red Fox, clip art of animals",
        "A red fox sitting in the grass",
        "clip art of animal, fox",  # most frequent tag first; "hash" and empty tags dropped
    ]
    assert by_title["blue whale"][:2] == ["blue whale", "blue whale, clip art of animals"]
    assert by_title["Green Apple"][0] == "Green Apple"  # the author's name is not part of the title
    assert by_title["Banana"] == ["Banana", "Banana, clip art of food", "clip art of fruit"]  # e-mail is no caption
    assert all(1 <= len(caps) <= 5 for caps in rows.values())
    for rel in rows:
        im = Image.open(out / rel)
        # Trimmed to the 30x20 drawing, then scaled to 32 px on the longest side.
        assert im.mode == "RGB" and im.size == (32, 21)
        assert im.getpixel((31, 0)) == im.getpixel((0, 20)) == (255, 255, 255)  # transparent black became white
        assert _close(im.getpixel((2, 2)), _RED) and _close(im.getpixel((29, 18)), _BLUE)


def test_openclipart_split_is_by_image_and_deterministic(clipart_root: Path, tmp_path: Path) -> None:
    a = build_openclipart(tmp_path / "a", image_size=16, val_fraction=0.5, seed=3, root=clipart_root)
    b = build_openclipart(tmp_path / "b", image_size=16, val_fraction=0.5, seed=3, root=clipart_root)
    train, val = _read_table(a["train"]), _read_table(a["val"])
    assert train and val and not set(train) & set(val)
    assert len(train) + len(val) == 4
    for key in ("train", "val", "val_classes"):
        assert a[key].read_text() == b[key].read_text()
    # Stratified by category: one of the two animals and one of the two foods held out.
    lines = [line.split(maxsplit=1) for line in a["val_classes"].read_text().splitlines()]
    assert sorted(label for _, label in lines) == ["animals", "food"]
    assert {path for path, _ in lines} == set(val)


def test_openclipart_manifest_makes_rebuild_a_no_op(
    clipart_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = build_openclipart(out, image_size=16, root=clipart_root)
    manifest = json.loads(first["manifest"].read_text())
    assert manifest["train_images"] + manifest["val_images"] == 4
    assert manifest["skipped"]["no_usable_title"] == 1

    def fail(*args: object) -> None:
        raise AssertionError("rebuilt although the parameters did not change")

    monkeypatch.setattr(openclipart, "_produce_images", fail)
    assert build_openclipart(out, image_size=16, root=clipart_root) == first
    monkeypatch.undo()
    # New parameters: rebuilt, and images of the old size are gone.
    paths = build_openclipart(out, image_size=24, root=clipart_root)
    sizes = {Image.open(p).size for p in paths["images"].iterdir()}
    assert sizes == {(24, 16)}


def test_openclipart_max_images(clipart_root: Path, tmp_path: Path) -> None:
    paths = build_openclipart(tmp_path / "out", image_size=16, max_images=2, root=clipart_root)
    assert len(_read_table(paths["train"]) | _read_table(paths["val"])) == 2


def test_missing_package_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataPackageMissingError, match=r"install_data_packages\.sh") as err:
        build_openclipart(tmp_path / "out", root=tmp_path / "nowhere")
    assert isinstance(err.value, ValueError)
    assert sources.main(["openclipart", "--out", str(tmp_path / "o"), "--root", str(tmp_path / "nowhere")]) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["openclipart", "--out", "o", "--image-size", "128", "--root", "nowhere"],
        ["emoji", "--out", "e", "--emojibase", "nowhere/data.json"],
    ],
)
def test_module_runs_as_the_makefile_calls_it(tmp_path: Path, args: list[str]) -> None:
    """`python -m cliptune.data.sources SOURCE ...` (the Makefile's data targets) reaches that source's builder."""
    out = subprocess.run(
        [sys.executable, "-m", "cliptune.data.sources", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 1 and "install_data_packages.sh" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Truck1", "Truck"), (" ireland", "ireland"), ("glace_01_bw", "glace 01 bw"), ("00_nomoon_openclipart", "nomoon")],
)
def test_clean_title(raw: str, expected: str) -> None:
    assert openclipart._clean_title(raw) == expected


def test_batch_titles_fall_back_to_file_names() -> None:
    assert openclipart._title_from_stem("star_75pt28step") == "star"
    assert openclipart._title_from_stem("RayonnementLaser") == "rayonnement laser"
    assert openclipart._title_from_stem("70a003") is None
    assert openclipart._BATCH_TITLE.search("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)")
    assert not openclipart._BATCH_TITLE.search("Red Fox")


def test_emoji_variants_share_a_split_group() -> None:
    person, man = "1F6A3", "1F6A3-200D-2642-FE0F"
    assert emoji._emoji_group_key(person) == emoji._emoji_group_key(man) == "1F6A3"
    assert emoji._emoji_group_key("1F468") == "1F468"
    assert emoji._emoji_label("flag: Germany") == "flag of Germany"


_FONT = sources.DEFAULT_EMOJI_FONT


@pytest.mark.skipif(not _FONT.is_file(), reason="fonts-noto-color-emoji not installed")
def test_emoji_build_with_real_font(tmp_path: Path) -> None:
    base = tmp_path / "emojibase-data" / "en"
    base.mkdir(parents=True)
    entries = [
        {"label": "grinning face", "hexcode": "1F600", "emoji": "\U0001f600", "group": 0, "tags": ["face", "grin"]},
        {"label": "flag: Germany", "hexcode": "1F1E9-1F1EA", "emoji": "\U0001f1e9\U0001f1ea", "group": 9, "tags": []},
        # A codepoint no font has: rendered blank, so skipped.
        {"label": "no such emoji", "hexcode": "1FAFF", "emoji": "\U0001faff", "group": 0, "tags": []},
        {"label": "light skin tone", "hexcode": "1F3FB", "emoji": "\U0001f3fb", "group": 2, "tags": []},
    ]
    (base / "data.json").write_text(json.dumps(entries), encoding="utf-8")
    messages = {"groups": [{"key": "smileys-emotion", "message": "smileys & emotion", "order": 0}]}
    (base / "messages.json").write_text(json.dumps(messages), encoding="utf-8")
    paths = build_emoji(tmp_path / "out", base / "data.json", image_size=32, val_fraction=0.5)
    rows = _read_table(paths["train"]) | _read_table(paths["val"])
    assert rows == {
        "images/1f600.png": ["an emoji of grinning face", "grinning face", "face, grin"],
        "images/1f1e9-1f1ea.png": ["an emoji of flag of Germany", "flag of Germany"],
    }
    assert json.loads(paths["manifest"].read_text())["skipped"] == {"not_in_font": 1}
    im = Image.open(tmp_path / "out/images/1f600.png")
    assert im.mode == "RGB" and max(im.size) == 32 and im.getpixel((0, 0)) == (255, 255, 255)
    labels = {line.split(maxsplit=1)[1] for line in paths["val_classes"].read_text().splitlines()}
    assert labels <= {"smileys & emotion", "9"}


def test_blank_drawings_are_dropped() -> None:
    assert common._on_white(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), 16) is None
    white_on_clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    white_on_clear.paste(Image.new("RGBA", (8, 8), (255, 255, 255, 255)), (4, 4))
    assert common._on_white(white_on_clear, 16) is None
