"""Throughput of cliptune's training against open_clip's own trainer, memory against batch size, loader speed.

    python benchmarks/throughput.py                          # all sections: ViT-B-32 and RN50, cuda if present
    python benchmarks/throughput.py --only train --archs ViT-B-32 --batch 16 --steps 10 --variants fp32 bf16
    python benchmarks/throughput.py --quick --no-write       # tiny settings, about a minute: a smoke run

Sections (`--only`):
  train   for each arch (random init), open_clip's training entry point (`python -m open_clip_train.main
          --dataset-type synthetic ...`) and cliptune run one after the other, each in a fresh process with the
          same threads, batch, precision, data-loader workers and optimizer settings. Each logs every step; the
          warm-up steps are dropped and the timed steps summed (data wait included, as open_clip counts it).
          cliptune's rows are `--variants`: a precision plus options (`bf16+compile`); a variant whose config key
          this cliptune lacks is skipped with a note. The ratio is against open_clip at the same precision.
  memory  cliptune's peak memory in one training step against the contrastive batch size, with and without
          `train.chunk_size`: peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA, above the process that
          only built the trainer.
  loader  images/s of cliptune's TrainPairs + DataLoader alone (no model) with 0, 1, 2 workers, and of
          open_clip's synthetic dataset, against the training samples/s measured in this invocation.
Writes benchmarks/RESULTS.md (section "throughput") with the machine, the date and the commands run.
Linux only: CPU memory is read from /proc/self/status.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section

SCRIPT = Path(__file__).resolve()
WORKER = "_cliptune_worker"
RESULT_MARK = "THROUGHPUT_RESULT "
# A variant is `precision[+option...]`; each option turns on one config key.
OPTIONS = {
    "grad_checkpointing": "train.grad_checkpointing=true",
    "compile": "runtime.compile=true",
    "channels_last": "runtime.channels_last=true",
}
DEFAULT_VARIANTS = ["fp32", "bf16", "bf16+channels_last", "bf16+compile", "bf16+grad_checkpointing"]
OPENCLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
LOADER_WORKERS = (0, 1, 2)
QUICK = {
    "archs": ["cliptune-tiny-vit"],
    "batch": 8,
    "steps": 3,
    "warmup": 1,
    "variants": ["fp32", "bf16"],
    "memory_batches": [16, 64],
    "chunk": 8,
    "loader_batches": 3,
}
FULL = {
    "archs": ["ViT-B-32", "RN50"],
    "batch": 16,
    "steps": 10,
    "warmup": 5,  # torch.compile compiles in the first step and recompiles for dynamic shapes in the second
    "variants": DEFAULT_VARIANTS,
    "memory_batches": [32, 128, 512, 1024],
    "chunk": 32,
    "loader_batches": 20,
}
# On a GPU a batch of 16 measures little but launch overheads, and one loader worker would starve it.
CUDA = {"batch": 128, "steps": 20}
CUDA_WORKERS = 8
ADJECTIVES = ("small", "large", "red", "green", "blue", "old", "young", "white", "wooden", "busy")
NOUNS = ("dog", "cat", "man", "woman", "child", "car", "bus", "table", "tree", "house", "bicycle", "horse")
VERBS = ("sitting", "standing", "running", "playing", "parked", "waiting")
PLACES = ("on a street", "in a park", "next to a river", "near the house", "under a tree", "in a kitchen")
_OPENCLIP_STEP = re.compile(r"Train Epoch: \d+ \[\s*\d+/\d+ .*?Batch \(t\): [\d.]+, (?P<rate>[0-9.eE+-]+)/s")


# ---------------------------------------------------------------------------------------------------------------
# Reading step times from the two trainers' logs


def openclip_step_seconds(log: str, batch: int) -> list[float]:
    """Seconds of each step in an open_clip_train log written with `--log-every-n-steps 1`.

    Each `Train Epoch` line gives `batch / seconds` of the step just ended (`X/s`, six significant digits) and the
    average `Batch (t)` beside it, which has three decimals only: too coarse for GPU steps, so the rate is used.
    Like cliptune's, open_clip's step time runs from the end of one step to the end of the next: data wait counts.
    """
    return [batch / float(m["rate"]) for m in _OPENCLIP_STEP.finditer(log)]


def cliptune_step_seconds(records: list[dict[str, Any]], batch: int) -> list[float]:
    """Seconds of each step from one epoch of train.jsonl written with `runtime.log_every=1`.

    Each record's `samples_per_s` is the epoch's running rate, samples so far / seconds since the epoch asked for
    its first batch: record k (from 1) says k * batch samples took k * batch / rate seconds.
    """
    elapsed = [(k + 1) * batch / record["samples_per_s"] for k, record in enumerate(records)]
    return [end - start for start, end in zip([0.0, *elapsed[:-1]], elapsed)]


@dataclass
class Timing:
    samples_per_s: float
    seconds_per_step: float
    fastest: float  # seconds of the fastest and the slowest timed step: how steady the machine was
    slowest: float


def timed(step_seconds: list[float], warmup: int, batch: int) -> Timing:
    """Samples/s over the steps after the first `warmup` (start-up, allocator and compile warm-up excluded)."""
    kept = step_seconds[warmup:]
    if not kept:
        raise ValueError(f"{len(step_seconds)} steps logged, none left after {warmup} warm-up steps")
    total = sum(kept)
    return Timing(batch * len(kept) / total, total / len(kept), min(kept), max(kept))


# ---------------------------------------------------------------------------------------------------------------
# Data: a caption table of random images, written once per image size


def caption(index: int) -> str:
    """10 to 13 words: about the length of a COCO caption, so cliptune's trimmed text tower does realistic work."""
    rng = random.Random(index)
    subject = " ".join([rng.choice(ADJECTIVES)] * rng.randint(0, 1) + [rng.choice(ADJECTIVES), rng.choice(NOUNS)])
    other = " ".join([rng.choice(ADJECTIVES)] * rng.randint(0, 1) + [rng.choice(NOUNS)])
    return f"a {subject} {rng.choice(VERBS)} with a {other} {rng.choice(PLACES)}"


def caption_table(work: Path, image_size: int, rows: int) -> Path:
    """A CSV of `rows` distinct random-noise PNGs (the table reader merges repeated paths) with one caption each."""
    folder = work / f"images{image_size}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        path = folder / f"{i:06d}.png"
        if not path.exists():
            pixels = np.random.default_rng(i).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
    table = work / f"table{image_size}_{rows}.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([str(folder / f"{i:06d}.png"), caption(i)] for i in range(rows))
    return table


def image_size(arch: str) -> int:
    import open_clip

    import cliptune.models.openclip  # noqa: F401  registers cliptune's tiny archs with open_clip

    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


# ---------------------------------------------------------------------------------------------------------------
# The two sides' commands, and running one in a fresh process


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def openclip_command(arch: str, batch: int, samples: int, precision: str, workers: int, device: str) -> list[str]:
    """open_clip's trainer on its synthetic data, with cliptune's default optimizer settings and no checkpoint."""
    from cliptune.config import OptimConfig
    from cliptune.models.openclip import TINY_ARCHS

    optim = OptimConfig()
    flags = f"--model {arch} --dataset-type synthetic --train-num-samples {samples} --batch-size {batch} --epochs 1"
    flags += f" --precision {OPENCLIP_PRECISION[precision]} --workers {workers} --device {device}"
    flags += " --log-every-n-steps 1 --save-frequency 0 --zeroshot-frequency 0 --report-to none --logs none"
    flags += f" --name bench --seed 0 --lr {optim.lr} --wd {optim.weight_decay} --warmup {optim.warmup_steps}"
    flags += f" --beta1 {optim.beta1} --beta2 {optim.beta2} --eps {optim.eps}"
    if optim.grad_clip is not None:
        flags += f" --grad-clip-norm {optim.grad_clip}"
    if arch not in TINY_ARCHS:
        return [sys.executable, "-m", "open_clip_train.main", *flags.split()]
    # cliptune's tiny archs are not open_clip's: register their configs, then call the same entry point.
    config_dir = Path(sys.modules["cliptune.models.openclip"].__file__).parent / "model_configs"
    launch = f"import sys, open_clip; open_clip.add_model_config({str(config_dir)!r}); "
    launch += "from open_clip_train.main import main; main(sys.argv[1:])"
    return [sys.executable, "-c", launch, *flags.split()]


def cliptune_command(
    table: Path, out: Path, arch: str, batch: int, device: str, threads: int, workers: int, overrides: list[str]
) -> list[str]:
    command = [sys.executable, str(SCRIPT), WORKER, "--table", str(table), "--out", str(out), "--arch", arch]
    command += ["--batch", str(batch), "--device", device, "--threads", str(threads), "--workers", str(workers)]
    for override in overrides:
        command += ["--set", override]
    return command


@dataclass
class Process:
    returncode: int
    output: str
    peak_rss_mib: float


def run_process(command: list[str], threads: int, cwd: Path) -> Process:
    """Run `command` to the end; its combined output and the peak RSS of that process alone.

    os.wait4 gives the usage of this one child; getrusage(RUSAGE_CHILDREN) holds the largest of every child so far.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=thread_env(threads), cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return Process(proc.returncode, out.read(), usage.ru_maxrss / 1024)  # KiB on Linux


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def worker_result(process: Process) -> dict[str, Any]:
    """The JSON line a cliptune worker printed last; RuntimeError with its output's tail if it failed."""
    lines = [line for line in process.output.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"cliptune worker failed (exit {process.returncode}):\n{tail(process.output)}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


# ---------------------------------------------------------------------------------------------------------------
# The cliptune side: one epoch of the real training loop, in its own process


def memory_mib(device: torch.device, peak: bool) -> float:
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
        return used / 2**20
    key = "VmHWM:" if peak else "VmRSS:"
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Writing 5 to clear_refs sets VmHWM back to the current RSS (Linux 4.0+): the peak is then training's own,
    # not a transient of building the model. Where it is refused the peak covers the build too (an upper bound).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def worker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "bench",
        "model": {"backend": "openclip", "arch": args.arch, "pretrained": None},
        "data": {"train": {"path": args.table}},
        "train": {"epochs": 1, "batch_size": args.batch},
        "runtime": {
            "output_dir": args.out,
            "device": args.device,
            "workers": args.workers,
            "log_every": 1,
            "progress": False,
            "seed": 0,
        },
    }


def cliptune_worker(argv: list[str]) -> int:
    """Build the trainer (not timed), train one epoch with cliptune's loop, print step times and memory as JSON."""
    parser = argparse.ArgumentParser(prog=f"throughput.py {WORKER}")
    for name in ("--table", "--out", "--arch", "--device"):
        parser.add_argument(name, required=True)
    for name in ("--batch", "--threads", "--workers"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    from cliptune import config as config_mod
    from cliptune.train.logging import TRAIN_LOG_FILE, read_jsonl
    from cliptune.train.loop import train_epoch
    from cliptune.train.setup import build_trainer

    trainer = build_trainer(config_mod.build(worker_config(args), args.set))
    built = memory_mib(trainer.device, peak=False)
    reset_peak(trainer.device)
    train_epoch(trainer, 0)
    peak = memory_mib(trainer.device, peak=True)
    trainer.log.close()
    records = read_jsonl(trainer.run_dir / TRAIN_LOG_FILE)
    if len(records) != trainer.steps_per_epoch:
        raise RuntimeError(f"train.jsonl holds {len(records)} steps, expected {trainer.steps_per_epoch}")
    result = {"step_seconds": cliptune_step_seconds(records, args.batch), "built_mib": built, "peak_mib": peak}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Section 1: training throughput


@dataclass
class Settings:
    archs: list[str]
    batch: int
    steps: int
    warmup: int
    variants: list[str]
    memory_batches: list[int]
    chunk: int
    loader_batches: int
    threads: int
    workers: int
    device: str
    memory_arch: str
    memory_precision: str
    skipped: list[str] = field(default_factory=list)


@dataclass
class Run:
    arch: str
    label: str
    precision: str
    command: list[str]
    timing: Timing | None = None
    peak_rss_mib: float | None = None
    error: str | None = None


def variant_overrides(variant: str) -> tuple[str, list[str]]:
    """`bf16+compile` -> ("bf16", ["runtime.precision=bf16", "runtime.compile=true"])."""
    precision, *options = variant.split("+")
    if precision not in OPENCLIP_PRECISION:
        raise ValueError(f"--variants: {variant!r} must start with a precision: {', '.join(OPENCLIP_PRECISION)}")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"--variants: {variant!r}: unknown option(s) {unknown}; known: {', '.join(OPTIONS)}")
    return precision, [f"runtime.precision={precision}", *(OPTIONS[o] for o in options)]


def unsupported(overrides: list[str]) -> str | None:
    """Why this cliptune's config rejects these overrides (a key not there yet), or None."""
    from cliptune import config as config_mod

    try:
        config_mod.build({}, overrides)
    except config_mod.ConfigError as e:
        return str(e).split(" (allowed:")[0]
    return None


def measure(run: Run, settings: Settings, cwd: Path, from_log: bool) -> Run:
    """Run one side; a failure is recorded in the row (with the output's tail printed) instead of ending the run."""
    print(f"[throughput] {run.arch} {run.label}: {shlex.join(run.command)}", flush=True)
    process = run_process(run.command, settings.threads, cwd)
    run.peak_rss_mib = process.peak_rss_mib
    try:
        steps = openclip_steps(process, settings) if from_log else worker_result(process)["step_seconds"]
        run.timing = timed(steps, settings.warmup, settings.batch)
    except (RuntimeError, ValueError) as e:
        run.error = str(e).splitlines()[-1] if str(e) else type(e).__name__
        print(f"[throughput] {run.arch} {run.label} FAILED: {e}", flush=True)
    return run


def openclip_steps(process: Process, settings: Settings) -> list[float]:
    if process.returncode != 0:
        raise RuntimeError(f"open_clip_train failed (exit {process.returncode}):\n{tail(process.output)}")
    steps = openclip_step_seconds(process.output, settings.batch)
    expected = settings.warmup + settings.steps
    if len(steps) != expected:
        # open_clip_train.main returns (exit 0) without training on some errors, e.g. a log folder already there
        raise RuntimeError(f"open_clip logged {len(steps)} steps, expected {expected}:\n{tail(process.output)}")
    return steps


def train_runs(settings: Settings, work: Path) -> list[Run]:
    samples = settings.batch * (settings.warmup + settings.steps)
    chosen = []
    for variant in settings.variants:
        precision, overrides = variant_overrides(variant)
        reason = unsupported(overrides)
        if reason:
            settings.skipped.append(f"cliptune {variant}: skipped, {reason}")
            print(f"[throughput] skipping variant {variant}: {reason}", flush=True)
        else:
            chosen.append((variant, precision, overrides))
    runs = []
    for arch in settings.archs:
        table = caption_table(work, image_size(arch), samples)
        # per precision, open_clip first and then cliptune's variants: a drift in the machine's load over the
        # invocation then falls on both sides of each ratio alike
        for precision in dict.fromkeys(p for _, p, _ in chosen):
            command = openclip_command(arch, settings.batch, samples, precision, settings.workers, settings.device)
            # a folder per run: open_clip refuses to start where a run of the same --name left its log
            cwd = work / "open_clip" / f"{arch}-{precision}"
            runs.append(measure(Run(arch, "open_clip_train", precision, command), settings, cwd, True))
            for variant, _, overrides in (c for c in chosen if c[1] == precision):
                out = work / "runs" / f"{arch}-{variant}"
                command = cliptune_command(
                    table, out, arch, settings.batch, settings.device, settings.threads, settings.workers, overrides
                )
                runs.append(measure(Run(arch, f"cliptune {variant}", precision, command), settings, work, False))
    return runs


def train_markdown(runs: list[Run], settings: Settings, work: Path) -> str:
    base = {(r.arch, r.precision): r.timing for r in runs if r.label == "open_clip_train" and r.timing}
    lines = [
        "### Training throughput",
        "",
        f"Random init, batch {settings.batch}, torch threads {settings.threads}, data-loader workers "
        f"{settings.workers}, device {settings.device}; each run a fresh process: {settings.warmup} warm-up steps, "
        f"then {settings.steps} timed steps (data wait included). open_clip's step times come from its `Train Epoch` "
        "log lines (`--log-every-n-steps 1`), cliptune's from train.jsonl (`runtime.log_every=1`) of one epoch of "
        "its training loop. Both use AdamW (cliptune's defaults), gradient clipping and the same learning rate.",
        "",
        "| arch | run | precision | samples/s | s/step (fastest-slowest) | peak RSS MiB | vs open_clip |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        ref = base.get((r.arch, r.precision))
        if r.timing is None:
            lines.append(f"| {r.arch} | {r.label} | {r.precision} | failed: {r.error} | | {r.peak_rss_mib:.0f} | |")
            continue
        ratio = f"{r.timing.samples_per_s / ref.samples_per_s:.2f}x" if ref else "n/a"
        lines.append(
            f"| {r.arch} | {r.label} | {r.precision} | {r.timing.samples_per_s:.2f} | "
            f"{r.timing.seconds_per_step:.3f} ({r.timing.fastest:.3f}-{r.timing.slowest:.3f}) | "
            f"{r.peak_rss_mib:.0f} | {ratio} |"
        )
    lines += ["", *(f"- {note}" for note in settings.skipped)] if settings.skipped else []
    lines += [
        "",
        "Data differs: open_clip's synthetic dataset runs its train transform on one blank image and tokenizes "
        '"Dummy caption" for every sample; cliptune decodes a distinct random-noise PNG per sample from a caption '
        "table and draws captions of 10-13 words. open_clip's text tower always runs all 77 positions; cliptune's "
        "OpenCLIP backend trims them to the longest caption in the batch.",
        *(
            ["", "On CUDA open_clip's trainer turns on TF32 matmuls and cudnn.benchmark (open_clip_train/main.py)."]
            if settings.device == "cuda"
            else []
        ),
        "",
        "Commands (`$WORK` is a temporary folder):",
        "",
        "```",
        *(f"OMP_NUM_THREADS={settings.threads} {shown(r.command, work)}" for r in runs),
        "```",
    ]
    return "\n".join(lines)


def shown(command: list[str], work: Path) -> str:
    """The command as run from the repository root, with the temporary folder named $WORK."""
    text = shlex.join(["python", *command[1:]]).replace(str(work), "$WORK")
    return text.replace(str(SCRIPT.parents[1]) + "/", "")


# ---------------------------------------------------------------------------------------------------------------
# Section 2: peak memory against batch size, with and without chunking


def memory_rows(settings: Settings, work: Path) -> list[dict[str, Any]]:
    size = image_size(settings.memory_arch)
    rows = []
    for batch in settings.memory_batches:
        table = caption_table(work, size, batch)  # one step per run: the table holds one batch
        for chunk in (None, settings.chunk):
            if chunk is not None and chunk >= batch:
                continue  # the whole batch fits in one chunk: the same run as without chunking
            overrides = [f"runtime.precision={settings.memory_precision}", f"train.chunk_size={chunk or 'null'}"]
            out = work / "memory" / f"b{batch}-c{chunk}"
            command = cliptune_command(
                table, out, settings.memory_arch, batch, settings.device, settings.threads, 0, overrides
            )
            print(f"[throughput] memory batch {batch} chunk {chunk}: {shlex.join(command)}", flush=True)
            process = run_process(command, settings.threads, work)
            row = {"batch": batch, "chunk": chunk, "inputs_mib": batch * 3 * size * size * 4 / 2**20}
            try:
                row |= worker_result(process)
            except RuntimeError as e:
                row["error"] = "out of memory" if "out of memory" in str(e).lower() else str(e).splitlines()[-1]
                print(f"[throughput] memory batch {batch} chunk {chunk} FAILED: {e}", flush=True)
            rows.append(row)
    return rows


def memory_markdown(rows: list[dict[str, Any]], settings: Settings) -> str:
    gauge = "torch.cuda.max_memory_allocated" if settings.device == "cuda" else "peak RSS (VmHWM)"
    size = image_size(settings.memory_arch)
    lines = [
        "### Peak memory against contrastive batch size",
        "",
        f"{settings.memory_arch} ({size}x{size} images), random init, {settings.memory_precision}, one training "
        f"step per run in a fresh process, data-loader workers 0 (decoding counts too), {gauge}. 'after build' is "
        "the process once the trainer was built (model, optimizer, data); 'increase' is the step's peak above it. "
        f"With chunking, a batch should need about the increase of a whole batch of {settings.chunk} plus its "
        "input tensors and the cached features (2 x batch x embed dim floats).",
        "",
        "| batch | train.chunk_size | input images MiB | after build MiB | peak MiB | increase MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['batch']} | {r['chunk'] or 'none'} | {r['inputs_mib']:.1f} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | |")
        else:
            increase = r["peak_mib"] - r["built_mib"]
            lines.append(f"{head} {r['built_mib']:.0f} | {r['peak_mib']:.0f} | {increase:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Section 3: the input pipeline alone


def images_per_s(loader: DataLoader) -> float:
    """Images/s once the loader is in its steady state.

    The clock starts when the batches the workers prefetched while starting (prefetch_factor each, 2 by default)
    have been taken: those were made before it started, and counting them would flatter more workers.
    """
    batches = iter(loader)
    for _ in range(warmup_batches(loader.num_workers)):
        next(batches)
    started, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch[0])
    return images / (time.perf_counter() - started)


def warmup_batches(workers: int) -> int:
    return 1 + 2 * workers


def loader_rows(settings: Settings, work: Path) -> list[dict[str, Any]]:
    from open_clip_train.data import SyntheticDataset

    from cliptune import config as config_mod
    from cliptune.config import ModelConfig, TableSpec
    from cliptune.data import TrainPairs, read_caption_table
    from cliptune.models import build_model
    from cliptune.train.data import make_loader

    torch.set_num_threads(settings.threads)
    rows = []
    for arch in settings.archs:
        size = image_size(arch)
        model = build_model(ModelConfig(backend="openclip", arch=arch, pretrained=None))
        samples = settings.batch * (settings.loader_batches + warmup_batches(max(LOADER_WORKERS)))
        table = read_caption_table(TableSpec(path=str(caption_table(work, size, samples))))
        ours = TrainPairs(table, model.train_transform, model.tokenize, seed=0)
        theirs = SyntheticDataset(model.train_transform, (size, size), dataset_size=samples, tokenizer=model.tokenize)
        for workers in LOADER_WORKERS:
            cfg = config_mod.build({"train": {"batch_size": settings.batch}, "runtime": {"workers": workers}})
            loaders = {
                "cliptune": make_loader(cfg, ours, epoch=0),
                "open_clip": DataLoader(theirs, settings.batch, shuffle=True, num_workers=workers, drop_last=True),
            }
            for pipeline, loader in loaders.items():
                rate = images_per_s(loader)
                rows.append({"arch": arch, "pipeline": pipeline, "workers": workers, "images_per_s": rate})
            print(f"[throughput] loader {arch} workers {workers}: {rows[-2]['images_per_s']:.0f} images/s", flush=True)
    return rows


def loader_markdown(rows: list[dict[str, Any]], runs: list[Run], settings: Settings) -> str:
    trained = {r.arch: r.timing.samples_per_s for r in runs if r.label == "cliptune fp32" and r.timing}
    names = {
        "cliptune": "cliptune TrainPairs (PNG decode, train transform, tokenize)",
        "open_clip": "open_clip SyntheticDataset (one blank image)",
    }
    lines = [
        "### Input pipeline alone",
        "",
        f"Images/s through the data loader only (no model), batch {settings.batch}, torch threads "
        f"{settings.threads}, {settings.loader_batches} batches timed after the loader's start-up and prefetch. The "
        "last column is how many times faster the loader is than cliptune fp32 training of that arch in this run: "
        "above 1, the towers and not the loader set the pace.",
        "",
        "| arch | pipeline | workers | images/s | x cliptune fp32 training samples/s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['images_per_s'] / trained[r['arch']]:.0f}x" if r["arch"] in trained else "n/a"
        lines.append(f"| {r['arch']} | {names[r['pipeline']]} | {r['workers']} | {r['images_per_s']:.0f} | {speed} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (cliptune-tiny-vit): a smoke run")
    parser.add_argument("--only", nargs="+", choices=["train", "memory", "loader"], default=None)
    parser.add_argument("--archs", nargs="+", help=f"default {FULL['archs']}")
    parser.add_argument("--batch", type=int, help=f"batch size (default {FULL['batch']}; {CUDA['batch']} on CUDA)")
    parser.add_argument(
        "--steps", type=int, help=f"timed steps per run (default {FULL['steps']}; CUDA {CUDA['steps']})"
    )
    parser.add_argument("--warmup", type=int, help=f"untimed steps first (default {FULL['warmup']})")
    parser.add_argument("--variants", nargs="+", help=f"cliptune rows (default {' '.join(FULL['variants'])})")
    parser.add_argument("--memory-batches", type=int, nargs="+", help=f"default {FULL['memory_batches']}")
    parser.add_argument("--chunk", type=int, help=f"train.chunk_size of the memory rows (default {FULL['chunk']})")
    parser.add_argument("--memory-arch", help="default: cliptune-tiny-vit on CPU, ViT-B-32 on CUDA")
    parser.add_argument("--memory-precision", choices=list(OPENCLIP_PRECISION), default="fp32")
    parser.add_argument("--loader-batches", type=int, help=f"timed batches (default {FULL['loader_batches']})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every run")
    parser.add_argument(
        "--workers", type=int, help=f"data-loader workers of the training runs (default 1; {CUDA_WORKERS} on CUDA)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--section", default="throughput", help="RESULTS.md section to write")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    preset = QUICK if args.quick else FULL | (CUDA if device == "cuda" else {})
    picked = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in preset.items()}
    workers = args.workers if args.workers is not None else CUDA_WORKERS if device == "cuda" else 1
    memory_arch = args.memory_arch or ("ViT-B-32" if device == "cuda" and not args.quick else "cliptune-tiny-vit")
    problem = check(picked, memory_arch)
    if device == "cuda" and not torch.cuda.is_available():
        problem = "--device cuda: no CUDA device is visible here; use --device cpu or auto"
    if problem:
        parser.error(problem)
    settings = Settings(
        **picked,
        threads=args.threads,
        workers=workers,
        device=device,
        memory_arch=memory_arch,
        memory_precision=args.memory_precision,
    )
    return settings, args


def check(picked: dict[str, Any], memory_arch: str) -> str | None:
    """What is wrong with the chosen settings, before any run starts, or None."""
    import open_clip

    import cliptune.models.openclip  # noqa: F401  registers cliptune's tiny archs with open_clip

    if picked["warmup"] < 1:
        return "--warmup must be >= 1: the first step holds process start-up (loader workers, allocations)"
    unknown = [a for a in [*picked["archs"], memory_arch] if a not in open_clip.list_models()]
    if unknown:
        return f"--archs / --memory-arch: not an open_clip architecture: {', '.join(unknown)} (see `cliptune models`)"
    try:
        for variant in picked["variants"]:
            variant_overrides(variant)
    except ValueError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:
        return cliptune_worker(argv[1:])
    settings, args = parse_args(argv)
    only = args.only or ["train", "memory", "loader"]
    with tempfile.TemporaryDirectory(prefix="cliptune-throughput-") as tmp:
        work = Path(tmp)
        runs = train_runs(settings, work) if "train" in only else []
        parts = [f"`{shlex.join(['python', 'benchmarks/throughput.py', *argv])}` on {machine()}."]
        if "train" in only:
            parts.append(train_markdown(runs, settings, work))
        if "memory" in only:
            parts.append(memory_markdown(memory_rows(settings, work), settings))
        if "loader" in only:
            parts.append(loader_markdown(loader_rows(settings, work), runs, settings))
    body = "\n\n".join(parts)
    if not args.no_write:
        write_section(args.section, body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
