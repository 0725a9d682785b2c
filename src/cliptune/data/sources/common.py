"""What the source builders share: the item record, image flattening, the parallel image pass, the grouped split,
the CSV tables and the manifest that makes a rebuild with the same parameters a no-op."""

from __future__ import annotations

import csv
import json
import multiprocessing
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# Bump when the output format or caption rules change, so old builds are not silently reused.
_FORMAT_VERSION = 1
_WORKERS = 2
_PROGRESS_EVERY = 1000
_INSTALL_HINT = "run `scripts/install_data_packages.sh` (as root, or with sudo) to install it"
_ALPHA_DUST = 8  # alpha (or colour spread) at or below this counts as empty


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
