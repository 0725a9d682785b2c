"""Opening images as RGB and checking, in parallel, that image files can be read."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cliptune.utils.files import is_within

logger = logging.getLogger("cliptune.data")

# Modes whose pixels carry alpha; palette and grey images may instead carry a `transparency` entry in `info`.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB copy of `image`; transparent pixels are composited on white.

    A plain `convert("RGB")` drops alpha and keeps whatever colour sits under it, which for most clip-art and
    logos is black, so the image would turn into a black square.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale scaled to 8 bits; PIL's own conversion clips them (to white).

    Integers are scaled by the range their values need (16-bit PNGs open as mode I); floats in [0, 1] by 255.
    """
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F":
        scaled = values * 255.0 if values.size and values.min() >= 0.0 and top <= 1.0 else values
    elif top > 65535:
        scaled = (values - values.min()) / max(top - values.min(), 1.0) * 255.0
    else:
        scaled = values / 257.0 if top > 255 or image.mode.startswith("I;16") else values
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode the image at `path` fully and return it as RGB; raises whatever PIL or the OS raises."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def is_readable(path: str | Path) -> bool:
    """True if `path` is a whole image file that PIL can read.

    A PNG's `verify` reads every chunk and its checksum without decoding pixels. A JPEG's `verify` reads nothing
    past the header, so a file cut short would pass and then abort an evaluation when encoded: it is decoded in
    draft mode instead (libjpeg's 1/8 scale, a fraction of a full decode), which still reads all of its data.
    Other formats have no useful `verify` and are decoded.
    """
    try:
        if not Path(path).is_file():
            return False
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
        return True
    except Exception:
        return False


def readable_mask(paths: Sequence[Path], workers: int | None = None) -> list[bool]:
    """`is_readable` for every path, in order, checked on a thread pool.

    The work is mostly file I/O and C decoding that releases the GIL, so threads give a real speed-up on
    network or cold disks without the start-up cost of processes.
    """
    if not paths:
        return []
    workers = workers or min(32, 4 * (os.cpu_count() or 2), len(paths))
    if workers <= 1:
        return [is_readable(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cliptune-imgcheck") as pool:
        return list(pool.map(is_readable, paths, chunksize=64))


def log_outside_root(source: Path, paths: Sequence[Path], root: Path) -> int:
    """Warn once how many image paths resolve outside `root` (`..`, absolute paths, symlinks out): a table is the
    user's own file, so they are read as given, but not silently."""
    outside = [p for p in paths if not is_within(p, [root])]
    if outside:
        logger.warning(
            "%s: %d of %d image paths resolve outside %s (through '..', absolute paths or symlinks), e.g. %s; "
            "they are read as given",
            source,
            len(outside),
            len(paths),
            root,
            outside[0],
        )
    return len(outside)


def describe_unreadable(path: Path) -> str:
    """`path` plus why it failed, for error messages: missing and corrupt files need different fixes."""
    return f"{path} ({'unreadable or not an image' if path.exists() else 'does not exist'})"


# Skipped images or samples named in one warning or report line (all of them are counted).
FIRST_NAMED = 5


def log_skipped(source: Path, skipped: Sequence[Path], total: int) -> None:
    """One warning for all the images of `source` that were skipped, with the count and the first few paths."""
    if not skipped:
        return
    first = ", ".join(str(p) for p in skipped[:FIRST_NAMED])
    more = ", ..." if len(skipped) > FIRST_NAMED else ""
    logger.warning(
        "%s: skipped %d of %d images that are missing or unreadable: %s%s",
        source,
        len(skipped),
        total,
        first,
        more,
    )
