"""Fault test: SIGKILL a training at random moments (some inside checkpoint writes), resume each time, and check the
finished run against an uninterrupted one, weight for weight, with nothing left behind.

    python benchmarks/kill_resume.py                 # 20 kills of a tiny run (10-30 min on 2 shared CPU cores)
    python benchmarks/kill_resume.py --kills 3 --no-record      # a quick look; records nothing

Every third kill lands inside a checkpoint write by construction: the run is started through `paused` (below), which
lets safetensors write a checkpoint file and then waits, so the kill finds the half-built checkpoint folder. The other
kills fall at a uniformly random moment of the next three epochs' time (training, evaluation or a checkpoint write),
counted from the end of the run's setup. After the last kill the run is resumed to its
end; its final weights must equal the uninterrupted run's bitwise, and the run folder must hold no temporaries.
Writes the RESULTS.md section "Kill and resume".

`python benchmarks/kill_resume.py paused SUBSTRING cliptune-args...` runs the CLI with that pause: after writing any
safetensors file whose path contains SUBSTRING, it prints `PAUSED <path>` and sleeps (tests use it too).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAUSED = "PAUSED "


def paused(substring: str, cli_args: list[str]) -> int:
    """The cliptune CLI, but every safetensors file whose path holds `substring` is followed by a long pause."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        real(tensors, filename, metadata=metadata)
        if substring in str(filename):
            print(PAUSED + str(filename), flush=True)
            time.sleep(3600)

    safetensors.torch.save_file = save_file  # before cliptune imports it
    from cliptune.cli import main

    return main(cli_args)


def start(args: list[str], pause_in: str | None = None) -> subprocess.Popen:
    """`cliptune ARGS` in a new process (through `paused` when a pause point is given)."""
    if pause_in is None:
        cmd = [sys.executable, "-m", "cliptune.cli", *args]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "paused", pause_in, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only wait on each other on a shared machine
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def kill_when_paused(proc: subprocess.Popen, timeout: float = 600) -> str | None:
    """Wait for the pause line and SIGKILL the process there; None if the run ended first."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith(PAUSED):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return line[len(PAUSED) :].strip()
        if time.time() > deadline:
            break
    proc.wait()
    return None


def write_config(work: Path, epochs: int) -> Path:
    from cliptune.data.synthetic import make_shapes

    shapes = work / "shapes"
    if not (shapes / "train.csv").exists():
        make_shapes(shapes, n_train=32, n_val=16, image_size=32)
    cfg = {
        "name": "run",
        "model": {"arch": "cliptune-tiny-vit"},
        "data": {"train": {"path": str(shapes / "train.csv")}},
        "eval": {"retrieval": [{"name": "val", "path": str(shapes / "val.csv")}]},
        "train": {"epochs": epochs, "batch_size": 16, "keep_checkpoints": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 3},
        "runtime": {"output_dir": str(work / "runs"), "progress": False, "seed": 0, "workers": 0},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*") if p.name.endswith((".tmp", ".old")))


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def reference(config: Path) -> float:
    """The uninterrupted run; returns the seconds each epoch after the first took (training, evaluation, checkpoint)."""
    started = time.time()
    proc = start(["train", str(config), "name=whole"])
    first = config.parent / "runs" / "whole" / "checkpoints" / "epoch_1"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.05)
    to_first = time.time() - started
    output = proc.communicate()[0]
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{output[-3000:]}")
    epochs = yaml.safe_load(config.read_text())["train"]["epochs"]
    return (time.time() - started - to_first) / max(epochs - 1, 1)


def _training_started(proc: subprocess.Popen, lines: list[str]) -> threading.Event:
    """An event set once the run logs its run directory (setup done: what follows is training), reading its output."""
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "run directory:" in line:
                started.set()
        started.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    return started


def one_kill(config: Path, run_dir: Path, inside_write: bool, window: float, rng: random.Random) -> dict:
    """Start (or resume) the run and SIGKILL it: inside a checkpoint write, or at a random moment of training."""
    args = ["train", str(config), "name=cut", "--resume"]
    lines: list[str] = []
    if inside_write:
        proc = start(args, pause_in="/.epoch_")
        kill_when_paused(proc)
    else:
        proc = start(args)
        _training_started(proc, lines).wait()
        time.sleep(rng.uniform(0, window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return {
        "finished": proc.returncode == 0,
        "in_write": any(f".{proc.pid}@" in t for t in temporaries(run_dir)),
        "checkpoint": latest.read_text() if (latest := run_dir / "checkpoints" / "latest").is_file() else "none",
        "log": "".join(lines),
    }


def run(kills: int, work: Path, epochs: int, seed: int) -> dict:
    config = write_config(work, epochs)
    per_epoch = reference(config)
    run_dir = work / "runs" / "cut"
    rng, attempts, started = random.Random(seed), [], time.time()
    window = 3 * per_epoch  # a kill within the first three epochs of what is left
    while len(attempts) < kills:
        attempt = one_kill(config, run_dir, len(attempts) % 3 == 2, window, rng)
        if attempt["finished"]:
            raise SystemExit("the run finished before every kill landed: raise --epochs")
        attempts.append(attempt)
        print(f"kill {len(attempts)}: inside a checkpoint write {attempt['in_write']}, latest {attempt['checkpoint']}")
    final = start(["train", str(config), "name=cut", "--resume"])
    final_log = final.communicate()[0]
    if final.returncode != 0:
        raise SystemExit(f"the final resume failed:\n{final_log[-3000:]}")
    logs = "".join(a["log"] for a in attempts) + final_log
    return {
        "kills": len(attempts),
        "inside_writes": sum(a["in_write"] for a in attempts),
        "equal": same_weights(work / "runs" / "whole", run_dir),
        "leftovers": temporaries(run_dir) + ([LOCK] if (run_dir / LOCK).exists() else []),
        "cleanups": logs.count("temporaries left by killed runs"),
        "takeovers": logs.count("taking over the lock of process"),
        "seconds": time.time() - started,
        "epochs": epochs,
    }


LOCK = "run.lock"


def markdown(r: dict, command: str) -> str:
    from _record import machine

    return f"""Measured by `{command}` on {machine()} (shared with other jobs).

A tiny run (cliptune-tiny-vit, 32 coloured-shape images, batch 16, {r["epochs"]} epochs, keep_checkpoints 2) SIGKILLed
{r["kills"]} times and resumed with `--resume` after each kill; every third kill was made to land inside a
checkpoint write (after safetensors wrote a file into the checkpoint's temporary folder).

| measure | value |
|---|---|
| kills | {r["kills"]} |
| of them inside a checkpoint write | {r["inside_writes"]} |
| final weights equal to the uninterrupted run's (bitwise) | {"yes" if r["equal"] else "NO"} |
| temporaries or lock file left at the end | {len(r["leftovers"])} |
| resumes that removed a dead writer's temporaries | {r["cleanups"]}+ |
| dead owners' locks taken over | {r["takeovers"]}+ |
| wall time | {r["seconds"]:.0f} s |

"+": counted from the logs of the randomly timed kills only (the paused runs' output is not kept past the pause)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["paused"]:
        return paused(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "kill_resume")
    parser.add_argument("--no-record", action="store_true", help="print the result, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    import shutil

    shutil.rmtree(args.work / "runs", ignore_errors=True)
    result = run(args.kills, args.work, args.epochs, args.seed)
    text = markdown(result, "python benchmarks/kill_resume.py" + (f" --kills {args.kills}" if args.kills != 20 else ""))
    print(text)
    if not args.no_record:
        from _record import write_section

        write_section("Kill and resume", text)
    return 0 if result["equal"] and not result["leftovers"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
