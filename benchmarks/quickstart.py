"""Measure the quickstart (`make demo`): held-out results, wall time, and what caching locked towers saves.

    python benchmarks/quickstart.py            # needs data/openclipart (make data/openclipart/manifest.json)

Runs, each timed end to end in this process:
  1. the quickstart config with an empty feature cache (what a first `make demo` pays),
  2. the same again with that cache filled (what a second `make demo` pays),
  3. one epoch with `train.cache_locked=false`: the locked towers run on every step and every evaluation,
     as they would without caching; multiplied by the epochs, it is the cost caching avoids.
Writes the figures to benchmarks/RESULTS.md (section "quickstart"), with the machine and the date.
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

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def timed_run(overrides: list[str]) -> tuple[dict, float]:
    started = time.perf_counter()
    results = cliptune.finetune(CONFIG, overrides=[*overrides, "runtime.progress=false"])
    return results, time.perf_counter() - started


def main() -> int:
    logging.disable(logging.INFO)
    epochs = config_mod.load(CONFIG).train.epochs
    work = Path(tempfile.mkdtemp(prefix="cliptune-bench-"))
    base = [f"runtime.output_dir={work}", f"runtime.feature_cache={work / 'cache'}"]
    cold, cold_s = timed_run([*base, "name=cold"])
    _, warm_s = timed_run([*base, "name=warm"])
    _, uncached_s = timed_run(
        [f"runtime.output_dir={work}", "name=uncached", "train.cache_locked=false", "train.epochs=1"]
    )
    # A run without the cache pays a training pass and an evaluation through the towers every epoch. The one-epoch
    # run also holds the baseline evaluation, which a real run pays once: x epochs overstates by that much per epoch.
    estimate_s = uncached_s * epochs
    shutil.rmtree(work)
    lines = [
        f"`python benchmarks/quickstart.py` on {machine()}.",
        "",
        f"configs/quickstart.yaml (lite0-minilm, both towers locked, {epochs} epochs), "
        f"{cold['run']['train_images']} training images / {cold['run']['train_captions']} captions:",
        "",
        "| eval set | metric | before (random heads) | after |",
        "|---|---|---:|---:|",
    ]
    for name, after in cold["final"].items():
        for metric in ("mean_recall", "i2t_R@1", "t2i_R@1", "acc1", "mean_per_class_recall"):
            if metric in after:
                lines.append(f"| {name} | {metric} | {cold['baseline'][name][metric]:.2f} | {after[metric]:.2f} |")
    lines += [
        "",
        "| run | wall time |",
        "|---|---:|",
        f"| first run (locked towers encode every image and caption once) | {cold_s / 60:.1f} min |",
        f"| second run (outputs read back from runtime.feature_cache) | {warm_s / 60:.1f} min |",
        f"| one epoch, train.cache_locked=false (towers run every step and evaluation) | {uncached_s / 60:.1f} min |",
        f"| {epochs} epochs without caching (estimate: x{epochs}; counts the baseline evaluation each time) "
        f"| {estimate_s / 60:.0f} min |",
    ]
    text = "\n".join(lines)
    write_section("quickstart", text)
    print(text)
    print(json.dumps({"cold_s": cold_s, "warm_s": warm_s, "uncached_epoch_s": uncached_s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
