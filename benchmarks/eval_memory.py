"""Peak memory of `cliptune.metrics.retrieval` against the full similarity matrix it avoids (issue 11.8).

Each size runs in a fresh process: one call pages in the code (BLAS kernels are large), then the peak resident size
is reset (/proc/self/clear_refs) and a second call is measured. glibc's standard tunables return freed buffers to the
system, so the figure is the call's working set rather than heap an earlier call left behind. Linux only.

    PYTHONPATH=src python benchmarks/eval_memory.py [--write LABEL]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SIZES = ((1000, 5000), (6000, 30000))
_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from cliptune import metrics

def resident(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

g = torch.Generator().manual_seed(0)
n_img, n_txt = int(sys.argv[1]), int(sys.argv[2])
img = torch.nn.functional.normalize(torch.randn(n_img, 64, generator=g), dim=1)
txt = torch.nn.functional.normalize(torch.randn(n_txt, 64, generator=g), dim=1)
owner = torch.arange(n_txt) % n_img
metrics.retrieval(img, txt, owner)
open("/proc/self/clear_refs", "w").write("5")
base = resident("VmRSS")
started = time.perf_counter()
metrics.retrieval(img, txt, owner)
print(resident("VmHWM") - base, time.perf_counter() - started)
"""


def measure(n_img: int, n_txt: int) -> tuple[int, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(n_img), str(n_txt)], capture_output=True, text=True, check=True, env=env
    )
    peak, seconds = out.stdout.split()
    return int(peak), float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="LABEL", help="write the table into benchmarks/RESULTS.md under LABEL")
    args = parser.parse_args()
    lines = ["| images x captions | full fp32 matrix | peak during retrieval() | seconds |", "|---|---|---|---|"]
    for n_img, n_txt in SIZES:
        peak, seconds = measure(n_img, n_txt)
        matrix = n_img * n_txt * 4
        lines.append(f"| {n_img} x {n_txt} | {matrix / 2**20:.0f} MiB | {peak / 2**20:+.0f} MiB | {seconds:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _record import machine, write_section

        import cliptune

        where = f"cliptune imported from `{Path(cliptune.__file__).parent}`"
        command = f"python benchmarks/eval_memory.py --write '{args.write}'"
        write_section(f"Evaluation memory: {args.write}", f"`{command}`, {where}, on {machine()}.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
