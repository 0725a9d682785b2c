"""Open Clip Art Library (`openclipart-png` + `openclipart-svg`): clip art whose SVG metadata gives a title, keywords
and sometimes a description; the top-level folder is a category usable as a zero-shot class."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cliptune.data.sources.common import (
    _FORMAT_VERSION,
    _INSTALL_HINT,
    DataPackageMissingError,
    _cap_groups,
    _dedupe,
    _existing_build,
    _Item,
    _norm,
    _on_white,
    _produce_images,
    _safe_name,
    _take,
    _write_dataset,
)

_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
# "unsorted" and "special" (gradients, patterns, templates) name no visual concept: no category caption, no class.
_VAGUE_CATEGORIES = frozenset({"unsorted", "special"})
# Titles that name a batch upload rather than the picture ("Lemon SVG theme" on 411 icons, "gramastar" on 1,375
# stars); such images take their title from their file name instead.
_BATCH_TITLE = re.compile(
    r"collection|theme|icon ?set|clip ?arts?\b|s[iu]bmission|symbol_signs|map symbols|road signs"
    r"|\b(icons|maps)\b|^gramastar$|^advertising$|^sallite$",
    re.IGNORECASE,
)
# "Clipart by Nicu Buculei - jigsaw_red_10": the part after the dash is some file of the batch, often not this one.
_AUTHOR_PREFIX = re.compile(r"^clip\s*art by [^-]+ - ", re.IGNORECASE)
# File-name fragments that are prefixes, authors' tags or numbering schemes, not words.
_STEM_JUNK = frozenset({"aiga", "bb", "gg", "bw", "bwh", "md", "fc", "pt", "step", "symbol", "openclipart", "clipart"})
# Tags that name an icon theme, an author, a tool or the archive itself, not what is drawn.
_JUNK_KEYWORD = re.compile(r"icon|theme|clip ?art|^hash\b|^(unsorted|magick|mapsym)$")
_JUNK_DESCRIPTION = re.compile(r"@|https?:|www\.|hash\(|inkscape|public domain|converted|collection", re.IGNORECASE)
# A description shared by more images than this is boilerplate ("EPS converted from http://aiga.org" on 122).
_MAX_DESCRIPTION_SHARE = 4
_DESCRIPTION_CHARS = (8, 200)
_MAX_KEYWORDS = 6
# Some sources are 3x2 px flags; nothing recognisable survives at any size.
_MIN_SOURCE_SIDE = 16
# Fifteen clip art PNGs exceed Pillow's 179 MP bomb guard but are genuine, so the guard is replaced by this budget.
# Two 20,990 x 29,700 px stop signs exceed it: decoding one needs about 8 GB, the others stay under 3 GB.
_MAX_SOURCE_PIXELS = 250_000_000


def build_openclipart(
    out_dir: Path,
    image_size: int = 96,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_images: int | None = None,
    root: Path = Path("/usr/share/openclipart"),
    max_per_title: int | None = 20,
) -> dict[str, Path]:
    """Build the Open Clip Art caption set into `out_dir` and return the written paths.

    `max_per_title` caps how many images may share one title (seeded choice): without it 1,375 near-identical
    "star" shapes and 226 playing "card"s would dominate both training and retrieval scores.
    """
    out_dir, root = Path(out_dir), Path(root)
    params = {
        "source": "openclipart",
        "format": _FORMAT_VERSION,
        "root": str(root.resolve()),
        "image_size": image_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_images": max_images,
        "max_per_title": max_per_title,
    }
    done = _existing_build(out_dir, params)
    if done is not None:
        return done
    for sub in ("png", "svg"):
        if not (root / sub).is_dir():
            raise DataPackageMissingError(f"{root / sub} not found: openclipart-{sub} is missing; {_INSTALL_HINT}")
    items, skipped = _openclipart_items(root, seed, max_per_title)
    items = _take(items, max_images, seed)
    jobs = [(it.source, str(out_dir / it.image), image_size) for it in items]
    items, failed = _produce_images(out_dir, items, jobs, _convert_clipart)
    skipped["image_unreadable_or_tiny"] = failed
    return _write_dataset(out_dir, items, params, val_fraction, seed, skipped)


@dataclass
class _ClipartMeta:
    png: Path
    rel: Path  # path of the real file under png/, without suffix
    title: str | None
    description: str | None
    keywords: list[str]
    creator: str | None


def _openclipart_items(root: Path, seed: int, max_per_title: int | None) -> tuple[list[_Item], dict[str, int]]:
    metas = [_read_clipart_meta(root, png) for png in _unique_pngs(root / "png")]
    # Corpus-wide counts separate boilerplate from content: shared descriptions are dropped, frequent keywords
    # (real words, not typos) are preferred, batch titles fall back to file names.
    desc_counts = Counter(_norm(m.description) for m in metas if m.description)
    keyword_counts = Counter(k for m in metas for k in set(m.keywords))
    raw_title_counts = Counter(m.title for m in metas if m.title)
    items: list[_Item] = []
    skipped = Counter[str]()
    for m in metas:
        title = _usable_title(m, raw_title_counts)
        if title is None:
            skipped["no_usable_title"] += 1
            continue
        items.append(_clipart_item(m, title, desc_counts, keyword_counts))
    items, capped = _cap_groups(items, max_per_title, seed)
    skipped["over_max_per_title"] = capped
    return items, dict(skipped)


def _unique_pngs(png_root: Path) -> list[Path]:
    """The PNG files under `png_root`, each once: 1,221 of the 8,121 paths are symlinks to the same images in other
    folders, and counting them twice would put one picture in both train and val."""
    real = {Path(os.path.realpath(p)) for p in png_root.rglob("*.png")}
    return sorted(p for p in real if p.is_file())


def _read_clipart_meta(root: Path, png: Path) -> _ClipartMeta:
    rel = png.relative_to(Path(os.path.realpath(root / "png"))).with_suffix("")
    svg = root / "svg" / rel.with_suffix(".svg")
    work = _svg_work(svg)
    if work is None:
        return _ClipartMeta(png, rel, None, None, [], None)
    # The cc:Work's own dc:title; the creator, publisher and rights agents carry dc:title elements too.
    creator = _text(work.find("dc:creator/cc:Agent/dc:title", _NS))
    tags = _clean_keywords(li.text for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS))
    # Some authors tag and title their work with their own name ("Chalet di montagna Architetto Francesco Rollandin").
    keywords = [k for k in tags if not creator or k != creator.lower()]
    title, description = _text(work.find("dc:title", _NS)), _text(work.find("dc:description", _NS))
    return _ClipartMeta(png, rel, title, description, keywords, creator)


def _svg_work(svg: Path) -> ET.Element | None:
    try:
        return ET.parse(svg).getroot().find(".//cc:Work", _NS)
    except (OSError, ET.ParseError):
        return None


def _text(element: ET.Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    return " ".join(element.text.split()) or None


def _clean_keywords(raw: Iterable[str | None]) -> list[str]:
    out: list[str] = []
    for kw in raw:
        kw = " ".join((kw or "").replace("_", " ").lower().split())
        # Drop empty tags, leftovers of a Perl exporter ("hash", "0x8b754fc") and bare numbers.
        if len(kw) < 2 or _JUNK_KEYWORD.search(kw) or re.fullmatch(r"(0x)?[0-9a-f]*\d[0-9a-f]*", kw):
            continue
        if kw not in out:
            out.append(kw)
    return out


def _usable_title(m: _ClipartMeta, raw_title_counts: Counter[str]) -> str | None:
    """The image's title, cleaned; the file name stands in for batch titles; None if nothing usable is left."""
    if m.title is None:
        return None
    raw = m.title
    stripped = _AUTHOR_PREFIX.sub("", raw)
    # An author-prefixed title on several images names one file of the batch, not this picture.
    shared_batch_name = stripped != raw and raw_title_counts[raw] > 1
    if m.creator:
        # Whole name or surname alone ("Coccinella Rollandin"); short words might be part of the title.
        for name in [m.creator, *(w for w in m.creator.split() if len(w) >= 4)]:
            stripped = re.sub(rf"\b{re.escape(name)}\b", " ", stripped, flags=re.IGNORECASE)
    if shared_batch_name or _BATCH_TITLE.search(stripped):
        return _title_from_stem(m.rel.name)
    return _clean_title(stripped)


def _clean_title(raw: str) -> str | None:
    t = re.sub(r"\.(svg|png)$", "", raw.strip(), flags=re.IGNORECASE)
    t = re.sub(r"\bopenclipart\b", " ", t.replace("_", " "), flags=re.IGNORECASE)
    t = re.sub(r"^0\d\s+", "", t)  # "00 moonphases": zero-padded sequence numbers
    t = re.sub(r"[\s\d.,:;-]+$", "", t)  # "Truck1", "glace 01": numbering, not content
    t = " ".join(t.split())
    return t if re.search(r"[A-Za-z]{2}", t) else None


def _title_from_stem(stem: str) -> str | None:
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)  # "RayonnementLaser" -> "Rayonnement Laser"
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", spaced)]
    words = [w for w in words if len(w) > 1 and w not in _STEM_JUNK]
    return " ".join(words) or None


def _clipart_item(m: _ClipartMeta, title: str, desc_counts: Counter[str], keyword_counts: Counter[str]) -> _Item:
    category = m.rel.parts[0]
    category_text = category.replace("_", " ")
    captions = [title]
    if category not in _VAGUE_CATEGORIES:
        captions.append(f"{title}, clip art of {category_text}")
    description = _usable_description(m, title, desc_counts)
    if description:
        captions.append(description)
    # Images without tags fall back on their sub-folder names ("flags", "africa").
    keywords = m.keywords or _clean_keywords(m.rel.parts[1:-1])
    # Most frequent first: common tags ("frog", "animal") describe; rare ones are often typos ("kwaakwaa").
    keywords = sorted(keywords, key=lambda k: -keyword_counts[k])[:_MAX_KEYWORDS]
    if keywords:
        captions.append("clip art of " + ", ".join(keywords))
    return _Item(
        source=str(m.png),
        image="images/" + _safe_name("__".join(m.rel.parts)) + ".png",
        captions=_dedupe(captions),
        label=None if category in _VAGUE_CATEGORIES else category_text,
        group=title.lower(),
    )


def _usable_description(m: _ClipartMeta, title: str, desc_counts: Counter[str]) -> str | None:
    raw = m.description
    if raw is None or desc_counts[_norm(raw)] > _MAX_DESCRIPTION_SHARE or _JUNK_DESCRIPTION.search(raw):
        return None
    if m.creator and m.creator.lower() in raw.lower():
        return None  # a signature, not a description
    low, high = _DESCRIPTION_CHARS
    if len(raw) > high:
        raw = re.split(r"(?<=[.!?])\s", raw, maxsplit=1)[0]
    # A description that only repeats the title adds a duplicate, not a caption.
    if not low <= len(raw) <= high or _norm(raw).rstrip("0123456789") in _norm(title):
        return None
    return raw


def _convert_clipart(job: tuple[str, str, int]) -> bool:
    """Worker: clip art PNG -> RGB PNG on white with `size` px on the longest side; False if unusable."""
    src, dst, size = job
    try:
        with _large_images_allowed(), Image.open(src) as im:
            if max(im.size) < _MIN_SOURCE_SIDE or im.width * im.height > _MAX_SOURCE_PIXELS:
                return False
            # RGBA covers every source mode, P/L/RGB with a tRNS key included.
            rgb = _on_white(im.convert("RGBA"), size)
    except (OSError, ValueError):
        return False
    if rgb is None:
        return False
    rgb.save(dst)
    return True


@contextlib.contextmanager
def _large_images_allowed() -> Iterator[None]:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # `_convert_clipart` checks `_MAX_SOURCE_PIXELS` itself, from the header
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old
