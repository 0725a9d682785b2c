"""A balanced, seeded Fashion-MNIST subset as PNG files and `path<TAB>label` lists, from Debian's data package.

The source is `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`), which installs the four IDX files
of Zalando's release under /usr/share/datasets/fashion-mnist. `build_fashion_mnist` writes into `out`:

    images/{train,test}/<class>/<split>_<index>.png   RGB, upscaled from 28 px to `image_size` (bicubic); <class>
                                                      is the class name made file-safe, <index> the source row
    train.txt, test.txt   `path<TAB>class name` lines, paths relative to `out` (a tab: names hold spaces and "/")
    classes.txt           the class names in the label order `cliptune.data.read_classification` gives the lists
                          (sorted by name, as it orders named labels), one per line
    manifest.json         build parameters, counts, and each class's label in the original dataset

Train images come from the 60k training set, test images from the 10k test set, `per_class_*` of each class drawn
without replacement. A rebuild with the same parameters is skipped.

    python -m cliptune.data.fashion_mnist --out data/fashion --per-class-train 100 --per-class-test 50
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cliptune.data.sources import DataPackageMissingError

SOURCE = Path("/usr/share/datasets/fashion-mnist")
# Label i of the dataset is CLASSES[i] (Zalando's README).
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": "train", "test": "t10k"}  # our split -> the source file prefix
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (as root, or with sudo)"
_FORMAT_VERSION = 1  # bump when the output layout changes, so old builds are not reused

# IDX type codes (the third byte of the header) -> big-endian numpy dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array in an IDX file (gzipped or not): 2 zero bytes, a type code, the number of dimensions, each
    dimension as a big-endian uint32, then the data in C order.

    Written with numpy because no installed library exposes a public IDX reader (torchvision's is a private helper
    of its downloading dataset classes).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (it must start with 2 zero bytes and a known type code)")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: header gives shape {shape} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def load_split(split: str, source: Path = SOURCE) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of `train` or `test` (the t10k files)."""
    prefix = SPLITS[split]
    files = [source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"]
    for file in files:
        if not file.is_file():
            raise DataPackageMissingError(f"{file} not found: Fashion-MNIST is not installed; {_INSTALL_HINT}")
    images, labels = (read_idx(f) for f in files)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{source}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` row indices of each class (0..9), drawn without replacement, in ascending order."""
    picked = []
    for label, name in enumerate(CLASSES):
        rows = np.flatnonzero(labels == label)
        if per_class > len(rows):
            raise ValueError(f"{per_class} images per class asked, but class {name!r} has only {len(rows)} here")
        picked.append(rng.choice(rows, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def _safe_name(name: str) -> str:
    # "T-shirt/top" cannot be a folder name; a file-safe form keeps paths free of spaces and separators.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _write_split(out: Path, split: str, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, size: int) -> Path:
    lines = []
    for row in rows.tolist():
        name = CLASSES[int(labels[row])]
        relative = Path("images", split, _safe_name(name), f"{split}_{row:05d}.png")
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(images[row]).resize((size, size), Image.Resampling.BICUBIC)
        picture.convert("RGB").save(out / relative)
        lines.append(f"{relative.as_posix()}\t{name}\n")
    path = out / f"{split}.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _outputs(out: Path) -> dict[str, Path]:
    names = {"train": "train.txt", "test": "test.txt", "classes": "classes.txt", "manifest": "manifest.json"}
    return {key: out / name for key, name in names.items()} | {"images": out / "images"}


def build_fashion_mnist(
    out: Path,
    per_class_train: int,
    per_class_test: int,
    seed: int = 0,
    image_size: int = 64,
    source: Path = SOURCE,
) -> dict[str, Path]:
    """Write the subset described in the module doc into `out`; returns the paths of what it wrote."""
    out, source = Path(out), Path(source)
    for key, value in (("per_class_train", per_class_train), ("per_class_test", per_class_test)):
        if value < 1:
            raise ValueError(f"{key}: {value}; every class needs at least one image in each split")
    if image_size < 1:
        raise ValueError(f"image_size: {image_size}; give the side of the written images in pixels")
    params = {
        "format": _FORMAT_VERSION,
        "per_class_train": per_class_train,
        "per_class_test": per_class_test,
        "seed": seed,
        "image_size": image_size,
        "source": str(source),
    }
    paths = _outputs(out)
    if paths["manifest"].is_file():
        previous = json.loads(paths["manifest"].read_text(encoding="utf-8"))
        if previous.get("params") == params and all(p.exists() for p in paths.values()):
            return paths
        # The manifest proves the folder is ours: clear old images so none outlives its list line.
        paths["manifest"].unlink()
        shutil.rmtree(paths["images"], ignore_errors=True)
    per_class = {"train": per_class_train, "test": per_class_test}
    counts = {}
    for index, split in enumerate(SPLITS):
        images, labels = load_split(split, source)
        rows = balanced_indices(labels, per_class[split], np.random.default_rng([seed, index]))
        _write_split(out, split, images, labels, rows, image_size)
        counts[split] = len(rows)
    paths["classes"].write_text("".join(f"{name}\n" for name in sorted(CLASSES)), encoding="utf-8")
    manifest = {"params": params, "images": counts, "source_labels": {name: i for i, name in enumerate(CLASSES)}}
    # Written last: an interrupted build leaves no manifest and is redone next time.
    tmp = paths["manifest"].with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(paths["manifest"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cliptune.data.fashion_mnist", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--per-class-train", type=int, required=True, help="training images per class (<= 6000)")
    parser.add_argument("--per-class-test", type=int, required=True, help="test images per class (<= 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class sampling")
    parser.add_argument("--image-size", type=int, default=64, help="side of the written images, px")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the four IDX .gz files")
    args = parser.parse_args(argv)
    try:
        paths = build_fashion_mnist(
            args.out, args.per_class_train, args.per_class_test, args.seed, args.image_size, args.source
        )
    except ValueError as e:  # DataPackageMissingError included
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
