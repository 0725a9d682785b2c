"""`python -m cliptune.data.sources {openclipart,emoji} --out DIR ...`: build a source's caption set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cliptune.data.sources.common import DataPackageMissingError
from cliptune.data.sources.emoji import DEFAULT_EMOJI_FONT, build_emoji
from cliptune.data.sources.openclipart import build_openclipart

DESCRIPTION = "Build real image-caption tables offline from installed data packages."


def main(argv: list[str] | None = None) -> int:
    """`python -m cliptune.data.sources {openclipart,emoji} --out DIR ...`"""
    parser = argparse.ArgumentParser(prog="python -m cliptune.data.sources", description=DESCRIPTION)
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
