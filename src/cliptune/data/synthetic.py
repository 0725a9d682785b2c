"""A generated image-caption set (coloured shapes) for smoke runs and tests: small, offline, and learnable."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.3, "big": 0.8}


def _draw(shape: str, colour: tuple[int, int, int], scale: float, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    side = scale * size
    x0 = rng.uniform(0, size - side)
    y0 = rng.uniform(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    return image


def _captions(shape: str, colour: str, size: str) -> list[str]:
    return [f"a {size} {colour} {shape}", f"a {colour} {shape} on a white background", f"{colour} {shape}"]


def make_shapes(
    out_dir: str | Path, n_train: int = 240, n_val: int = 60, image_size: int = 64, seed: int = 0
) -> dict[str, Path]:
    """Write images/, train.csv and val.csv (captions as a JSON list column) under `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, count in (("train", n_train), ("val", n_val)):
        rows = []
        for i in range(count):
            shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
            name = f"images/{split}_{i:05d}.png"
            _draw(shape, COLOURS[colour], SIZES[size], image_size, rng).save(out_dir / name)
            rows.append({"image": name, "caption": json.dumps(_captions(shape, colour, size))})
        paths[split] = out_dir / f"{split}.csv"
        with paths[split].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="write the generated coloured-shapes image-caption set")
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--val", type=int, default=60)
    args = parser.parse_args(argv)
    for split, path in make_shapes(args.out_dir, args.train, args.val).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
