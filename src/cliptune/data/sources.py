"""Build real image-caption tables offline from installed data packages.

These machines reach only package registries, so the real data we can demo and benchmark on comes from Debian/npm
packages (see `scripts/install_data_packages.sh`):

- Open Clip Art Library (`openclipart-png` + `openclipart-svg`): clip art whose SVG metadata gives a title, keywords
  and sometimes a description; the top-level folder is a category usable as a zero-shot class.
- Noto Color Emoji (`fonts-noto-color-emoji`) rendered with Pillow, captioned from `emojibase-data` labels and tags.

Both builders write the same layout into `out_dir`:

    images/...           RGB PNGs, `image_size` px on the longest side, composited on white
    train.csv, val.csv   columns `image` (path relative to out_dir) and `caption` (a JSON list of strings)
    val_classes.txt      `path<TAB>label` lines for the val images (class names may contain spaces)
    manifest.json        build parameters and counts; a rebuild with the same parameters is skipped

Train and val are split by image *group* (one title, or one emoji without its gender/skin variants) and stratified by
label, so no held-out image, and no near-copy of one, is ever seen in training.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

# Bump when the output format or caption rules change, so old builds are not silently reused.
_FORMAT_VERSION = 1
_WORKERS = 2
_PROGRESS_EVERY = 1000
_INSTALL_HINT = "run `scripts/install_data_packages.sh` (as root, or with sudo) to install it"

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
_ALPHA_DUST = 8  # alpha (or colour spread) at or below this counts as empty
# Fifteen clip art PNGs exceed Pillow's 179 MP bomb guard but are genuine, so the guard is replaced by this budget.
# Two 20,990 x 29,700 px stop signs exceed it: decoding one needs about 8 GB, the others stay under 3 GB.
_MAX_SOURCE_PIXELS = 250_000_000

DEFAULT_EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# Noto Color Emoji is a bitmap font with a single strike: 109 px is the only size it can be loaded at.
_EMOJI_FONT_SIZE = 109
# Unicode joiners, presentation selectors, skin tones, gender signs and person/man/woman: dropping them from a
# hexcode leaves what an emoji shows, so "man rowing boat" and "person rowing boat" share a split group.
_EMOJI_VARIANT_CODES = frozenset(
    {"200D", "FE0F", "FE0E", "2640", "2642", "1F9D1", "1F468", "1F469", "1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
)
_EMOJI_COMPONENT_GROUP = 2  # skin-tone swatches and hair styles: not pictures of anything


class DataPackageMissingError(FileNotFoundError, ValueError):
    """A data package this builder reads from is not installed."""


@dataclass
class _Item:
    """One image to produce: where it comes from, where it goes, and what describes it."""

    source: str  # a file path (clip art) or the emoji's characters
    image: str  # output path relative to out_dir
    captions: list[str]
    label: str | None  # zero-shot class, None to keep it out of val_classes.txt
    group: str  # split unit: items sharing a group land in the same split


# ---------------------------------------------------------------------------------------------------------------------
# Open Clip Art Library


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


# ---------------------------------------------------------------------------------------------------------------------
# Emoji


def build_emoji(
    out_dir: Path,
    emojibase_json: Path,
    font_path: Path = DEFAULT_EMOJI_FONT,
    image_size: int = 64,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Path]:
    """Render every emoji the font has and caption it from emojibase; return the written paths."""
    out_dir, emojibase_json, font_path = Path(out_dir), Path(emojibase_json), Path(font_path)
    if not emojibase_json.is_file():
        raise DataPackageMissingError(f"{emojibase_json} not found: emojibase-data is missing; {_INSTALL_HINT}")
    if not font_path.is_file():
        raise DataPackageMissingError(f"{font_path} not found: fonts-noto-color-emoji is missing; {_INSTALL_HINT}")
    params = {
        "source": "emoji",
        "format": _FORMAT_VERSION,
        "emojibase_json": str(emojibase_json.resolve()),
        "font_path": str(font_path.resolve()),
        "image_size": image_size,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    done = _existing_build(out_dir, params)
    if done is not None:
        return done
    items = _emoji_items(emojibase_json)
    jobs = [(it.source, str(font_path), str(out_dir / it.image), image_size) for it in items]
    items, missing = _produce_images(out_dir, items, jobs, _render_emoji)
    return _write_dataset(out_dir, items, params, val_fraction, seed, {"not_in_font": missing})


def _emoji_items(emojibase_json: Path) -> list[_Item]:
    entries = json.loads(emojibase_json.read_text(encoding="utf-8"))
    group_names = _emoji_group_names(emojibase_json.parent / "messages.json")
    items = []
    for e in entries:
        # Ungrouped entries are bare regional-indicator letters; components are swatches. Skin-tone variants
        # (`skins`) are left out: the same picture five times over.
        group = e.get("group")
        if group is None or group == _EMOJI_COMPONENT_GROUP or not e.get("emoji"):
            continue
        label = _emoji_label(e["label"])
        tags = [t for t in e.get("tags", []) if t.lower() != label.lower()][:5]
        captions = [f"an emoji of {label}", label] + ([", ".join(tags)] if tags else [])
        items.append(
            _Item(
                source=e["emoji"],
                image=f"images/{e['hexcode'].lower()}.png",
                captions=_dedupe(captions),
                label=group_names.get(group, str(group)),
                group=_emoji_group_key(e["hexcode"]),
            )
        )
    return items


def _emoji_group_names(messages_json: Path) -> dict[int, str]:
    """Group index -> readable name ("smileys & emotion"), from the locale's messages.json when it is there."""
    if not messages_json.is_file():
        return {}
    groups = json.loads(messages_json.read_text(encoding="utf-8")).get("groups", [])
    return {g["order"]: g["message"] for g in groups}


def _emoji_label(label: str) -> str:
    if label.startswith("flag: "):
        return "flag of " + label[len("flag: ") :]
    return label.replace(": ", ", ")


def _emoji_group_key(hexcode: str) -> str:
    codes = hexcode.upper().split("-")
    kept = [c for c in codes if c not in _EMOJI_VARIANT_CODES]
    return "-".join(kept or codes[:1])


@functools.lru_cache(maxsize=2)
def _emoji_font(font_path: str) -> ImageFont.FreeTypeFont:
    # Raqm shapes ZWJ sequences and flags into one glyph; the basic layout draws their parts side by side.
    engine = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    return ImageFont.truetype(font_path, _EMOJI_FONT_SIZE, layout_engine=engine)


def _render_emoji(job: tuple[str, str, str, int]) -> bool:
    """Worker: draw one emoji on white; False when the font lacks it (blank or split into several glyphs)."""
    text, font_path, dst, size = job
    font = _emoji_font(font_path)
    left, top, right, bottom = font.getbbox(text)
    width, height = right - left, bottom - top
    # An unknown sequence falls apart into its pieces drawn in a row: wider than any single emoji glyph.
    if width <= 0 or height <= 0 or width > 1.5 * height:
        return False
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), text, font=font, embedded_color=True)
    rgb = _on_white(canvas, size)
    if rgb is None:
        return False
    rgb.save(dst)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Shared: images, split, tables, manifest


def _on_white(rgba: Image.Image, size: int) -> Image.Image | None:
    """Trim transparent margins, resize so the longest side is `size`, flatten onto white; None if nothing shows.

    Transparent pixels of clip art and emoji are often black underneath, which would otherwise come out as black
    backgrounds. Trimming matters because many clip art PNGs are a whole Inkscape page with a small drawing on it
    (in 7% of them the drawing spans less than half the canvas); faint anti-aliasing dust is ignored.
    """
    box = rgba.getchannel("A").point(lambda a: 255 if a > _ALPHA_DUST else 0).getbbox()
    if box is None:
        return None
    rgba = rgba.crop(box)
    scale = size / max(rgba.size)
    new = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
    # Pillow resamples RGBA with premultiplied alpha, so no dark fringes; reducing_gap keeps huge sources fast.
    rgba = rgba.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    rgb = background.convert("RGB")
    # White drawings on transparency vanish on white: a blank image is no example of anything.
    if all(high - low < _ALPHA_DUST for low, high in rgb.getextrema()):
        return None
    return rgb


def _produce_images(
    out_dir: Path, items: list[_Item], jobs: Sequence[tuple], worker: Callable[[tuple], bool]
) -> tuple[list[_Item], int]:
    """Run `worker` over `jobs` in a process pool; keep the items whose image was written."""
    for folder in {(out_dir / it.image).parent for it in items}:
        folder.mkdir(parents=True, exist_ok=True)
    ok: list[bool] = []
    with multiprocessing.Pool(_WORKERS) as pool:
        for i, success in enumerate(pool.imap(worker, jobs, chunksize=16), 1):
            ok.append(success)
            if i % _PROGRESS_EVERY == 0 or i == len(jobs):
                print(f"  images: {i}/{len(jobs)} ({i - sum(ok)} skipped)", flush=True)
    kept = [it for it, good in zip(items, ok) if good]
    return kept, len(items) - len(kept)


def _cap_groups(items: list[_Item], max_per_group: int | None, seed: int) -> tuple[list[_Item], int]:
    if max_per_group is None:
        return items, 0
    by_group: dict[str, list[_Item]] = {}
    for it in items:
        by_group.setdefault(it.group, []).append(it)
    rng = random.Random(seed)
    kept: list[_Item] = []
    for group in sorted(by_group):
        members = by_group[group]
        kept += rng.sample(members, max_per_group) if len(members) > max_per_group else members
    return sorted(kept, key=lambda it: it.image), len(items) - len(kept)


def _take(items: list[_Item], max_images: int | None, seed: int) -> list[_Item]:
    """A seeded sample rather than the first N, so a small build still covers every category."""
    if max_images is None or max_images >= len(items):
        return items
    return sorted(random.Random(seed).sample(items, max_images), key=lambda it: it.image)


def _split(items: list[_Item], val_fraction: float, seed: int) -> tuple[list[_Item], list[_Item]]:
    """Split whole groups, per label, so val holds about `val_fraction` of every class and shares no group with
    train."""
    groups: dict[str, list[_Item]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    by_label: dict[str, list[list[_Item]]] = {}
    for name in sorted(groups):
        members = groups[name]
        # A group spanning labels is filed under its smallest one; it still goes to one side as a whole.
        key = min(str(it.label) for it in members)
        by_label.setdefault(key, []).append(members)
    rng = random.Random(seed)
    train: list[_Item] = []
    val: list[_Item] = []
    for key in sorted(by_label):
        label_groups = by_label[key]
        rng.shuffle(label_groups)
        target = round(val_fraction * sum(len(g) for g in label_groups))
        n_val = 0
        for members in label_groups:
            if n_val + len(members) <= target:
                val += members
                n_val += len(members)
            else:
                train += members
    return sorted(train, key=lambda it: it.image), sorted(val, key=lambda it: it.image)


def _write_dataset(
    out_dir: Path, items: list[_Item], params: dict, val_fraction: float, seed: int, skipped: dict[str, int]
) -> dict[str, Path]:
    train, val = _split(items, val_fraction, seed)
    paths = _output_paths(out_dir)
    _write_table(paths["train"], train)
    _write_table(paths["val"], val)
    lines = [f"{it.image}\t{it.label}\n" for it in val if it.label]  # a tab: class names hold spaces
    paths["val_classes"].write_text("".join(lines), encoding="utf-8")
    counts = [len(it.captions) for it in items]
    manifest = {
        "params": params,
        "train_images": len(train),
        "val_images": len(val),
        "val_classes": len({it.label for it in val if it.label}),
        "captions": sum(counts),
        "captions_per_image": dict(sorted(Counter(counts).items())),
        "skipped": skipped,
    }
    # Written last, through a rename: an interrupted build leaves no manifest and is redone next time.
    tmp = paths["manifest"].with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(paths["manifest"])
    print(f"wrote {out_dir}: {len(train)} train + {len(val)} val images, {sum(counts)} captions", flush=True)
    return paths


def _write_table(path: Path, items: list[_Item]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for it in items:
            writer.writerow([it.image, json.dumps(it.captions, ensure_ascii=False)])


def _output_paths(out_dir: Path) -> dict[str, Path]:
    return {
        "train": out_dir / "train.csv",
        "val": out_dir / "val.csv",
        "val_classes": out_dir / "val_classes.txt",
        "manifest": out_dir / "manifest.json",
        "images": out_dir / "images",
    }


def _existing_build(out_dir: Path, params: dict) -> dict[str, Path] | None:
    """The paths of a finished build with the same parameters; otherwise prepare `out_dir` for a fresh one."""
    paths = _output_paths(out_dir)
    if paths["manifest"].is_file():
        previous = json.loads(paths["manifest"].read_text(encoding="utf-8"))
        if previous.get("params") == params and all(p.exists() for p in paths.values()):
            print(f"{out_dir} is up to date (same parameters); nothing to do", flush=True)
            return paths
        # The manifest proves the folder is ours: clear old images so no stale file outlives its table row.
        paths["manifest"].unlink()
        shutil.rmtree(paths["images"], ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _safe_name(name: str) -> str:
    # No spaces or odd characters: list files are split on whitespace and paths travel across systems.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _dedupe(captions: list[str]) -> list[str]:
    out: list[str] = []
    for c in captions:
        if c and c.lower() not in {o.lower() for o in out}:
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m cliptune.data.sources {openclipart,emoji} --out DIR ...`"""
    parser = argparse.ArgumentParser(prog="python -m cliptune.data.sources", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    oca = sub.add_parser("openclipart", help="Open Clip Art Library (openclipart-png + openclipart-svg)")
    oca.add_argument("--out", type=Path, required=True, help="output folder")
    oca.add_argument("--image-size", type=int, default=96, help="longest side of the written images, px")
    oca.add_argument("--max-images", type=int, default=None, help="seeded sample of at most this many images")
    oca.add_argument("--max-per-title", type=int, default=20, help="at most this many images share one title")
    oca.add_argument("--root", type=Path, default=Path("/usr/share/openclipart"), help="openclipart install root")
    emo = sub.add_parser("emoji", help="Noto Color Emoji rendered with emojibase labels and tags")
    emo.add_argument("--out", type=Path, required=True, help="output folder")
    emo.add_argument("--emojibase", type=Path, required=True, help="path to emojibase-data/en/data.json")
    emo.add_argument("--font", type=Path, default=DEFAULT_EMOJI_FONT, help="Noto Color Emoji .ttf")
    emo.add_argument("--image-size", type=int, default=64, help="longest side of the written images, px")
    for p in (oca, emo):
        p.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out for val")
        p.add_argument("--seed", type=int, default=0, help="seed for the split and the sampling")
    args = parser.parse_args(argv)
    try:
        if args.source == "openclipart":
            paths = build_openclipart(
                args.out, args.image_size, args.val_fraction, args.seed, args.max_images, args.root, args.max_per_title
            )
        else:
            paths = build_emoji(args.out, args.emojibase, args.font, args.image_size, args.val_fraction, args.seed)
    except DataPackageMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
