"""What keeping freed memory on the heap (`cliptune.utils.memory`) does to a CPU forward pass.

    python benchmarks/heap.py                 # lite0-minilm's image tower, batch 128 at 224 px, fp32 channels-last
    python benchmarks/heap.py --quick         # the tiny ViT, a smoke run; records nothing

Each setting runs in its own process (glibc's allocator is set once per process): `CLIPTUNE_MALLOC=system` keeps
glibc's defaults, the other calls `keep_freed_memory()` as cliptune's commands do. Reported: images/s of the bare
image tower over one random batch repeated for `--seconds`, the process's user and system CPU seconds, and whether
the two settings' outputs are bit-identical. Writes the RESULTS.md section "heap".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section

SETTINGS = {"glibc defaults (CLIPTUNE_MALLOC=system)": "system", "heap kept (cliptune's commands)": ""}


def child(model_name: str, batch: int, seconds: float) -> None:
    """Runs in a fresh process: time the forward, print JSON."""
    import torch
    from PIL import Image

    from cliptune.inference import load_any
    from cliptune.utils.memory import keep_freed_memory

    tuned = keep_freed_memory()
    torch.manual_seed(0)
    model = load_any(model_name).eval().to(memory_format=torch.channels_last)
    size = model.eval_transform(Image.new("RGB", (256, 256))).shape[-1]  # the model's own input size
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = model.encode_image(x)  # warm-up, and the output compared across settings
        before = resource.getrusage(resource.RUSAGE_SELF)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model.encode_image(x)
            done += batch
        wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "tuned": tuned,
                "images_per_s": done / wall,
                "user_s": after.ru_utime - before.ru_utime,
                "sys_s": after.ru_stime - before.ru_stime,
                "wall_s": wall,
                "checksum": first.double().sum().item(),
                "first": first[0, :8].tolist(),
            }
        )
    )


def measure(model: str, batch: int, seconds: float) -> dict[str, dict]:
    results = {}
    for name, value in SETTINGS.items():
        env = dict(os.environ, CLIPTUNE_MALLOC=value)
        command = [sys.executable, __file__, "--child", "--model", model, "--batch", str(batch)]
        out = subprocess.run([*command, "--seconds", str(seconds)], env=env, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    return results


def report(results: dict[str, dict], model: str, batch: int) -> str:
    rows = [
        f"| {name} | {r['images_per_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['wall_s']:.1f} |"
        for name, r in results.items()
    ]
    a, b = results.values()
    same = a["first"] == b["first"] and a["checksum"] == b["checksum"]
    return "\n".join(
        [
            f"`python benchmarks/heap.py` on {machine()}. Model {model}, image tower only, one random batch of "
            f"{batch} images at the model's input size repeated, fp32 channels-last, each setting in its own process:",
            "",
            "| heap | images/s | user CPU s | system CPU s | wall s |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"Outputs bit-identical across the two settings: {'yes' if same else 'NO'}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite0-minilm")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.batch, args.seconds = "cliptune-tiny-vit", 8, 1.0
    if args.child:
        child(args.model, args.batch, args.seconds)
        return
    results = measure(args.model, args.batch, args.seconds)
    body = report(results, args.model, args.batch)
    print(body)
    if not args.quick:
        write_section("heap", body)


if __name__ == "__main__":
    main()
