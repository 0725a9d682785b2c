"""Measure the quickstart (`make demo`): held-out results, wall time, and what caching locked towers saves.

    python benchmarks/quickstart.py            # needs data/openclipart (make data/openclipart/manifest.json)
    python benchmarks/quickstart.py --skip-uncached   # without run 3 (the longest)

Runs, each timed end to end in this process:
  1. the quickstart config with an empty feature cache (what a first `make demo` pays),
  2. the same again with that cache filled (what a second `make demo` pays),
  3. one epoch with `train.cache_locked=false`: the locked towers run on every step and every evaluation,
     as they would without caching; multiplied by the epochs, it is the cost caching avoids.
Reports the held-out figures of the selected weights (model/, chosen on the validation split of the training
titles) and of the last epoch. Writes them to benchmarks/RESULTS.md (section "quickstart"), with the machine and
the date.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cliptune
from cliptune import config as config_mod
from cliptune.train.logging import epoch_text
from cliptune.utils.memory import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def timed_run(overrides: list[str]) -> tuple[dict, float]:
    started = time.perf_counter()
    results = cliptune.finetune(CONFIG, overrides=[*overrides, "runtime.progress=false"])
    return results, time.perf_counter() - started


def main() -> int:
    skip_uncached = "--skip-uncached" in sys.argv[1:]
    keep_freed_memory()  # as `cliptune train` does (benchmarks/heap.py)
    logging.disable(logging.INFO)
    epochs = config_mod.load(CONFIG).train.epochs
    work = Path(tempfile.mkdtemp(prefix="cliptune-bench-"))
    base = [f"runtime.output_dir={work}", f"runtime.feature_cache={work / 'cache'}"]
    cold, cold_s = timed_run([*base, "name=cold"])
    _, warm_s = timed_run([*base, "name=warm"])
    uncached_s = None
    if not skip_uncached:
        _, uncached_s = timed_run(
            [f"runtime.output_dir={work}", "name=uncached", "train.cache_locked=false", "train.epochs=1"]
        )
    # A run without the cache pays a training pass and an evaluation through the towers every epoch. The one-epoch
    # run also holds the baseline evaluation, which a real run pays once: x epochs overstates by that much per epoch.
    shutil.rmtree(work)
    text = "\n".join(_figures(cold, epochs) + _times(cold_s, warm_s, uncached_s, epochs, skip_uncached))
    write_section("quickstart", text)
    print(text)
    print(json.dumps({"cold_s": cold_s, "warm_s": warm_s, "uncached_epoch_s": uncached_s}))
    return 0


def _figures(cold: dict, epochs: int) -> list[str]:
    sel = cold["selection"]
    best, last = sel["best"], sel["last"]
    best_epoch, last_epoch = epoch_text(best["epoch"]), epoch_text(last["epoch"])
    validation = cold["run"]["validation_images"]
    lines = [
        f"`python benchmarks/quickstart.py` on {machine()}.",
        "",
        f"configs/quickstart.yaml (lite0-minilm, both towers locked, {epochs} epochs), "
        f"{cold['run']['train_images']} training images / {cold['run']['train_captions']} captions, and "
        f"{validation} images of the training titles held back as the validation split. Selection on "
        f"`{sel['metric']}`: best {best['value']:.2f} after epoch {best_epoch} (step {best['step']}), "
        f"{last['value']:.2f} after the last epoch ({last_epoch}). Held-out sets:",
        "",
        f"| eval set | metric | before (random heads) | selected (model/, epoch {best_epoch}) | last epoch |",
        "|---|---|---:|---:|---:|",
    ]
    for name in sel["reported_sets"]:
        after, end, before = cold["final"][name], cold["last"][name], cold["baseline"][name]
        for metric in ("mean_recall", "i2t_R@1", "t2i_R@1", "acc1", "mean_per_class_recall"):
            if metric in after:
                lines.append(f"| {name} | {metric} | {before[metric]:.2f} | {after[metric]:.2f} | {end[metric]:.2f} |")
    return lines


def _times(cold_s: float, warm_s: float, uncached_s: float | None, epochs: int, skipped: bool) -> list[str]:
    lines = [
        "",
        "| run | wall time |",
        "|---|---:|",
        f"| first run (locked towers encode every image and caption once) | {cold_s / 60:.1f} min |",
        f"| second run (outputs read back from runtime.feature_cache) | {warm_s / 60:.1f} min |",
    ]
    if skipped or uncached_s is None:
        return [*lines, "", "The run without caching was skipped (--skip-uncached); see git history for it."]
    return [
        *lines,
        f"| one epoch, train.cache_locked=false (towers run every step and evaluation) | {uncached_s / 60:.1f} min |",
        f"| {epochs} epochs without caching (estimate: x{epochs}; counts the baseline evaluation each time) "
        f"| {uncached_s * epochs / 60:.0f} min |",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
