"""The Fashion-MNIST builder (cliptune.data.fashion_mnist): IDX parsing, the balanced seeded subset, and list files
that cliptune.data.read_classification reads with the real class names."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliptune.config import ZeroShotSpec
from cliptune.data import read_classification
from cliptune.data.fashion_mnist import CLASSES, SOURCE, build_fashion_mnist, main, read_idx
from cliptune.data.sources import DataPackageMissingError

PER_CLASS = {"train": 4, "test": 3}  # rows of each class in the fake source


def write_idx(path: Path, array: np.ndarray, code: int) -> None:
    """An IDX file written field by field from the format's description (big-endian header, then the data)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + big_endian.tobytes())


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST's four files with a few 28x28 images per class; pixel (0, 0) holds the row number."""
    folder = tmp_path_factory.mktemp("fashion-src")
    rng = np.random.default_rng(0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), PER_CLASS[split]))
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(len(labels))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 0x08)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08)
    return folder


@pytest.mark.parametrize(("dtype", "code"), [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)])
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_round_trips_what_was_written(tmp_path: Path, dtype, code: int, suffix: str) -> None:
    values = np.arange(30) * 8  # up to 232: fits a byte
    array = (values if dtype == np.uint8 else values - 100).astype(dtype).reshape(2, 3, 5)  # signed: negatives too
    write_idx(tmp_path / f"x.idx{suffix}", array, code)
    got = read_idx(tmp_path / f"x.idx{suffix}")
    assert got.shape == (2, 3, 5) and got.dtype == np.dtype(dtype) and np.array_equal(got, array)


def test_read_idx_refuses_files_that_are_not_idx(tmp_path: Path) -> None:
    (tmp_path / "a.idx").write_bytes(b"\x89PNG not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "a.idx")
    write_idx(tmp_path / "b.idx", np.zeros((4, 2), dtype=np.uint8), 0x08)
    (tmp_path / "b.idx").write_bytes((tmp_path / "b.idx").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shape \(4, 2\) \(20 bytes\) but the file has 19 bytes"):
        read_idx(tmp_path / "b.idx")


@pytest.mark.skipif(not SOURCE.is_dir(), reason=f"{SOURCE} absent: apt-get install dataset-fashion-mnist")
def test_read_idx_on_the_installed_test_set() -> None:
    images = read_idx(SOURCE / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.array_equal(np.bincount(labels), np.full(10, 1000))


def test_builder_writes_a_balanced_set_read_classification_reads(fake_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "fashion"
    paths = build_fashion_mnist(out, per_class_train=3, per_class_test=2, image_size=28, source=fake_source)
    classes = paths["classes"].read_text(encoding="utf-8").splitlines()
    assert sorted(classes) == sorted(CLASSES) and "T-shirt/top" in classes and "Ankle boot" in classes
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["images"] == {"train": 30, "test": 20}
    assert manifest["source_labels"]["T-shirt/top"] == 0 and manifest["source_labels"]["Ankle boot"] == 9
    for split, per_class in (("train", 3), ("test", 2)):
        data = read_classification(ZeroShotSpec(path=str(paths[split])))
        assert data.classnames == classes  # classes.txt is the order the reader gives
        assert np.array_equal(np.bincount(data.labels, minlength=10), np.full(10, per_class))
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(fake_source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(fake_source / f"{prefix}-labels-idx1-ubyte.gz")
        for path, label in zip(data.paths, data.labels):
            row = int(path.stem.split("_")[-1])
            assert classes[label] == CLASSES[labels[row]]  # the name in the list is the source row's class
            pixels = np.asarray(Image.open(path))
            assert pixels.shape == (28, 28, 3) and np.array_equal(pixels[..., 1], images[row])
        assert len({p.stem for p in data.paths}) == len(data.paths)  # without replacement


def test_builder_is_seeded_upscales_and_skips_an_up_to_date_build(fake_source: Path, tmp_path: Path) -> None:
    def listing(out: Path, seed: int, size: int = 32) -> str:
        paths = build_fashion_mnist(out, 2, 1, seed=seed, image_size=size, source=fake_source)
        return paths["train"].read_text() + paths["test"].read_text()

    first = listing(tmp_path / "a", seed=0)
    assert listing(tmp_path / "b", seed=0) == first
    assert any(listing(tmp_path / "c", seed=s) != first for s in (1, 2, 3))
    image = Image.open(tmp_path / "a" / first.split("\t")[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    marker = tmp_path / "a" / "train.txt"
    marker.write_text(marker.read_text() + "# untouched\n")  # a skipped rebuild leaves this line in place
    build_fashion_mnist(tmp_path / "a", 2, 1, seed=0, image_size=32, source=fake_source)
    assert marker.read_text().endswith("# untouched\n")
    build_fashion_mnist(tmp_path / "a", 2, 1, seed=0, image_size=16, source=fake_source)
    assert not marker.read_text().endswith("# untouched\n")
    assert {Image.open(p).size for p in (tmp_path / "a" / "images").rglob("*.png")} == {(16, 16)}


def test_clear_errors(fake_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DataPackageMissingError, match="apt-get install dataset-fashion-mnist"):
        build_fashion_mnist(tmp_path / "x", 1, 1, source=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="5 images per class asked, but class 'T-shirt/top' has only 4"):
        build_fashion_mnist(tmp_path / "y", 5, 1, source=fake_source)
    with pytest.raises(ValueError, match="per_class_test: 0"):
        build_fashion_mnist(tmp_path / "z", 1, 0, source=fake_source)
    args = ["--out", str(tmp_path / "cli"), "--per-class-train", "1", "--per-class-test", "1"]
    assert main([*args, "--source", str(tmp_path / "nowhere")]) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert main([*args, "--source", str(fake_source), "--image-size", "24"]) == 0
    assert len(list((tmp_path / "cli" / "images").rglob("*.png"))) == 20


@pytest.mark.skipif(not SOURCE.is_dir(), reason=f"{SOURCE} absent: apt-get install dataset-fashion-mnist")
def test_builder_on_the_installed_files(tmp_path: Path) -> None:
    paths = build_fashion_mnist(tmp_path / "real", per_class_train=1, per_class_test=2, image_size=32)
    test = read_classification(ZeroShotSpec(path=str(paths["test"])))
    assert test.classnames == sorted(CLASSES) and len(test) == 20
    assert np.array_equal(np.bincount(test.labels), np.full(10, 2))
