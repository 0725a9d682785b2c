"""Noto Color Emoji (`fonts-noto-color-emoji`) rendered with Pillow, captioned from `emojibase-data` labels and
tags."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from cliptune.data.sources.common import (
    _FORMAT_VERSION,
    _INSTALL_HINT,
    DataPackageMissingError,
    _dedupe,
    _existing_build,
    _Item,
    _on_white,
    _produce_images,
    _write_dataset,
)

DEFAULT_EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# Noto Color Emoji is a bitmap font with a single strike: 109 px is the only size it can be loaded at.
_EMOJI_FONT_SIZE = 109
# Unicode joiners, presentation selectors, skin tones, gender signs and person/man/woman: dropping them from a
# hexcode leaves what an emoji shows, so "man rowing boat" and "person rowing boat" share a split group.
_EMOJI_VARIANT_CODES = frozenset(
    {"200D", "FE0F", "FE0E", "2640", "2642", "1F9D1", "1F468", "1F469", "1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
)
_EMOJI_COMPONENT_GROUP = 2  # skin-tone swatches and hair styles: not pictures of anything


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
