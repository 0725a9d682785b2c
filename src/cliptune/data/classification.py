"""Reading labelled images for zero-shot classification: a folder per class, or a `path label` list file."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from cliptune.config import ZeroShotSpec
from cliptune.data.errors import DataError
from cliptune.data.images import describe_unreadable, log_outside_root, log_skipped, readable_mask

logger = logging.getLogger("cliptune.data")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# `path label` where the path may contain spaces: everything up to the last run of whitespace is the path.
_LIST_LINE = re.compile(r"^(?P<path>.*\S)\s+(?P<label>\S+)$")


@dataclass
class LabelledImages:
    """Usable images with integer labels that index `classnames`."""

    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    name: str = ""
    skipped: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def read_classification(spec: ZeroShotSpec, check_images: bool = True) -> LabelledImages:
    """Read `spec.path` (a class-per-folder directory or a list file); unreadable images are skipped and warned."""
    root = Path(spec.path).expanduser()
    if root.is_dir():
        paths, labels, classnames = _read_folders(root, spec.classnames)
        log_outside_root(root, paths, root)  # symlinks out of the class folders
    elif root.is_file():
        paths, labels, classnames = _read_list_file(root, spec)
    else:
        raise DataError(
            f"{root}: does not exist; `path` of zero-shot set {spec.name!r} must be a folder with "
            f"one sub-folder per class, or a list file of `path label` lines"
        )
    skipped: list[Path] = []
    if check_images:
        paths, labels, skipped = _keep_readable(root, paths, labels)
    return LabelledImages(paths=paths, labels=labels, classnames=classnames, name=spec.name, skipped=skipped)


def _keep_readable(root: Path, paths: list[Path], labels: list[int]) -> tuple[list[Path], list[int], list[Path]]:
    unique = list(dict.fromkeys(paths))  # a list file may name one image twice; verify it once
    ok = dict(zip(unique, readable_mask(unique)))
    bad = [p for p in unique if not ok[p]]
    if not any(ok.values()):
        raise DataError(f"{root}: 0 of {len(unique)} images could be read; first: {describe_unreadable(bad[0])}")
    log_skipped(root, bad, len(unique))
    kept = [(p, label) for p, label in zip(paths, labels) if ok[p]]
    return [p for p, _ in kept], [label for _, label in kept], bad


def _is_hidden(path: Path, under: Path) -> bool:
    # Hidden entries are tool debris (.ipynb_checkpoints, macOS `._x.jpg` AppleDouble files), not images.
    return any(part.startswith(".") for part in path.relative_to(under).parts)


def image_files(folder: Path) -> list[Path]:
    files = (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not _is_hidden(p, folder))
    return sorted(p for p in files if p.is_file())


def _read_folders(root: Path, override: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(
            f"{root}: has no class sub-folders; put each class's images in a sub-folder named after "
            f"the class, or point `path` at a `path label` list file"
        )
    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, folder in enumerate(folders):
        files = image_files(folder)
        if not files:
            empty.append(folder.name)
        paths += files
        labels += [label] * len(files)
    if not paths:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"{root}: no image files ({suffixes}) in any of its {len(folders)} class folders")
    if empty:
        logger.warning("%s: %d class folders have no images (kept as classes): %s", root, len(empty), ", ".join(empty))
    classnames = [f.name.replace("_", " ") for f in folders]
    if override is not None:
        if len(override) != len(folders):
            raise DataError(
                f"{root}: `classnames` has {len(override)} names but there are {len(folders)} class "
                f"folders ({', '.join(f.name for f in folders)}); give one name per folder, in this order"
            )
        classnames = list(override)
    return paths, labels, classnames


def _parse_list_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, path, label) for every entry line; blank lines and `#` comments are ignored."""
    entries = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if "\t" in text:  # `path<TAB>label` is unambiguous when a class name holds spaces
            image, _, label = text.partition("\t")
            entries.append((line_no, image.strip(), label.strip()))
            continue
        match = _LIST_LINE.match(text)
        if match is None:
            raise DataError(
                f"{path}, line {line_no}: expected `path label` (an image path, whitespace, then an "
                f"integer label or a class name; use a tab if the class name has spaces), got {text!r}"
            )
        entries.append((line_no, match["path"], match["label"]))
    if not entries:
        raise DataError(f"{path}: no `path label` lines; add one line per image")
    return entries


def _read_list_file(path: Path, spec: ZeroShotSpec) -> tuple[list[Path], list[int], list[str]]:
    entries = _parse_list_lines(path)
    base = Path(spec.images_root).expanduser() if spec.images_root else path.parent
    paths = [Path(p).expanduser() for _, p, _ in entries]
    paths = [p if p.is_absolute() else base / p for p in paths]
    log_outside_root(path, paths, base)
    numeric = [(n, label) for n, _, label in entries if re.fullmatch(r"[+-]?\d+", label)]
    if numeric and len(numeric) < len(entries):
        word = next((n, label) for n, _, label in entries if not re.fullmatch(r"[+-]?\d+", label))
        raise DataError(
            f"{path}: labels mix integers (line {numeric[0][0]}: {numeric[0][1]!r}) and class names "
            f"(line {word[0]}: {word[1]!r}); use integer indices or class names throughout"
        )
    if numeric:
        labels, classnames = _integer_labels(path, entries, spec.classnames)
    else:
        labels, classnames = _named_labels(path, [label for _, _, label in entries], spec.classnames)
    return paths, labels, classnames


def _integer_labels(
    path: Path, entries: list[tuple[int, str, str]], override: list[str] | None
) -> tuple[list[int], list[str]]:
    labels = [int(label) for _, _, label in entries]
    for (line_no, _, raw), label in zip(entries, labels):
        if label < 0:
            raise DataError(f"{path}, line {line_no}: label {raw!r} is negative; labels index `classnames` from 0")
    needed = max(labels) + 1
    if override is None:
        # Prompts like "a photo of a 3." carry no meaning for the text tower, so this is almost always a mistake.
        logger.warning(
            "%s: integer labels but no `classnames`; the class names will be the numbers 0..%d", path, needed - 1
        )
        return labels, [str(i) for i in range(needed)]
    if len(override) < needed:
        raise DataError(
            f"{path}: labels go up to {needed - 1}, so `classnames` needs at least {needed} names, "
            f"but it has {len(override)}; add the missing names in label order"
        )
    return labels, list(override)


def _named_labels(path: Path, names: list[str], override: list[str] | None) -> tuple[list[int], list[str]]:
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    if override is not None:
        if len(override) != len(classes):
            raise DataError(
                f"{path}: `classnames` has {len(override)} names but the file uses {len(classes)} "
                f"distinct labels ({', '.join(classes)}); give one name per label, in sorted order"
            )
        classes = list(override)
    return [index[name] for name in names], classes
