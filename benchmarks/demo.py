"""`make demo`, timed step by step: cold (no feature cache), with and without cliptune's heap setting.

    make data/openclipart/manifest.json .venv/.installed   # the data set and the venv, built once
    python benchmarks/demo.py                  # the demo's steps as `make -n demo` lists them, each timed
    python benchmarks/demo.py --baseline       # also once with CLIPTUNE_MALLOC=system (glibc's defaults)
    python benchmarks/demo.py --repeat 3       # the demo three times (wall times on a VM vary by ~20%)

"Cold" is the README's sense: the data set is built, but `runs/.feature_cache` is removed first, so every image
and caption goes through the locked towers. The commands are read from the Makefile (`make -n demo`), so this
times exactly what `make demo` runs. Wall time per step includes each command's interpreter start-up. Writes the
RESULTS.md section "demo" and prints the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section

ROOT = Path(__file__).resolve().parent.parent


def demo_commands() -> list[str]:
    """The demo's own recipe, from the Makefile itself (echo lines left out; prerequisites are already built)."""
    listing = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = listing.replace("\\\n", " ").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rm -rf runs/quickstart"))
    return [line for line in lines[start:] if line.strip() and not line.startswith(("printf", "echo"))]


def label(command: str) -> str:
    words = command.split()
    name = Path(words[0]).name
    if name != "cliptune":
        return name
    target = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--index")), "")
    return f"cliptune {words[1]} {Path(target).name}".strip()


def run(commands: list[str], env: dict[str, str]) -> list[tuple[str, float]]:
    shutil.rmtree(ROOT / "runs" / ".feature_cache", ignore_errors=True)  # cold: the towers run on every input
    times = []
    for command in commands:
        start = time.perf_counter()
        subprocess.run(command, shell=True, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append((label(command), time.perf_counter() - start))
        print(f"{times[-1][1]:7.1f} s  {command}", flush=True)
    return times


def table(rows: dict[str, list[tuple[str, float]]]) -> str:
    names = list(rows)
    steps = [step for step, _ in rows[names[0]]]
    lines = ["| step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(f"{rows[n][i][1]:.1f} s" for n in names) + " |")
    totals = " | ".join(f"**{sum(t for _, t in rows[n]) / 60:.2f} min**" for n in names)
    lines.append(f"| whole demo | {totals} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="also run with CLIPTUNE_MALLOC=system")
    parser.add_argument("--repeat", type=int, default=1, help="times to run the demo with cliptune's heap setting")
    parser.add_argument("--note", default="", help="conditions to record (e.g. other jobs on the machine)")
    args = parser.parse_args()
    commands = demo_commands()
    rows = {}
    for i in range(args.repeat):
        rows["cliptune (heap kept)" + (f", run {i + 1}" if args.repeat > 1 else "")] = run(commands, dict(os.environ))
    if args.baseline:
        rows["CLIPTUNE_MALLOC=system"] = run(commands, dict(os.environ, CLIPTUNE_MALLOC="system"))
    body = (
        f"`python benchmarks/demo.py{' --baseline' if args.baseline else ''}"
        f"{f' --repeat {args.repeat}' if args.repeat > 1 else ''}` on {machine()}"
        f"{'; ' + args.note if args.note else ''}. Cold: `runs/.feature_cache` removed first; data set and "
        "`.venv` already built. Wall time per step, interpreter start-up included.\n\n" + table(rows)
    )
    write_section("demo", body)
    print(body)


if __name__ == "__main__":
    main()
