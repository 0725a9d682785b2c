"""Compare fine-tuning strategies on a real offline domain shift: clip art -> emoji (the seed-000 table layout).

    make data/openclipart/manifest.json data/emoji/manifest.json
    python benchmarks/strategies.py [--epochs 2] [--train-images 800]

1. Source model: lite0-minilm (EfficientNet-Lite0 + all-MiniLM-L6-v2, real pretrained towers) with its projection
   heads aligned on Open Clip Art, towers locked (the quickstart recipe).
2. Each strategy fine-tunes that model on Noto emoji (a different visual style) with the same seed, data, batch and
   epochs; held-out emoji mean recall says what it gained, held-out clip-art mean recall what it forgot.
3. WiSE-FT sweeps the best strategy's weights between the source model and its fine-tuned weights.
Writes the table to benchmarks/RESULTS.md (section "strategies") with the machine and the date.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import cliptune
from cliptune.api import resolve_config
from cliptune.eval import Encoding, EvalSuite
from cliptune.inference import load_any
from cliptune.tuning.wise import INITIAL_FILE, load_initial, sweep

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section
from objectives import LITE_DROP_PATH

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-strategies"
CACHE = str(ROOT / "runs" / ".feature_cache")
EVAL = {
    "retrieval": [
        {"name": "emoji", "path": str(ROOT / "data/emoji/val.csv")},
        {"name": "clipart", "path": str(ROOT / "data/openclipart/val.csv")},
    ],
    "batch_size": 128,
}
# The last EfficientNet-Lite0 stage and the last MiniLM layer: the partial-locking row unlocks only these.
PARTIAL = {
    "lock_image": True,
    "lock_image_patterns": "!_blocks.15,!_conv_head,!_bn1",
    "lock_text": True,
    "lock_text_patterns": "!encoder.layer.5",
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "linear heads": {"finetune": {"lock_image": True, "lock_text": True, "heads": "linear"}},
    "MLP heads": {"finetune": {"lock_image": True, "lock_text": True, "heads": "mlp"}},
    "lock image, tune text": {"finetune": {"lock_image": True}},
    "lock text, tune image": {"finetune": {"lock_text": True}},
    "full fine-tuning": {"finetune": {}},
    "partial locking": {"finetune": PARTIAL},
    "partial locking + layer decay": {
        "finetune": PARTIAL,
        "optim": {"layer_decay_image": 0.7, "layer_decay_text": 0.7},
    },
    "partial locking + layer decay + EMA": {
        "finetune": {**PARTIAL, "ema_decay": 0.99},
        "optim": {"layer_decay_image": 0.7, "layer_decay_text": 0.7},
    },
    "LoRA (text attention + MLP, r=8)": {"finetune": {"lock_image": True, "lora": {"rank": 8, "towers": ["text"]}}},
}


def source_model(epochs: int) -> str:
    """The quickstart recipe, aligned on clip art; its run directory is the starting point of every strategy."""
    out = cliptune.finetune(
        ROOT / "configs/quickstart.yaml",
        overrides=[
            f"runtime.output_dir={WORK}",
            "name=source",
            f"train.epochs={epochs}",
            f"runtime.feature_cache={CACHE}",
            "runtime.progress=false",
        ],
    )
    return out["run_dir"]


def run_strategy(name: str, extra: dict[str, Any], init: str, args: argparse.Namespace, train_csv: Path) -> dict:
    cfg = {
        "name": name.replace(" ", "_")
        .replace(",", "")
        .replace("+", "and")
        .replace("(", "")
        .replace(")", "")
        .replace("=", ""),
        "model": {"init": init, "drop_path": LITE_DROP_PATH},
        "data": {"train": {"path": str(train_csv), "images_root": str(ROOT / "data/emoji")}},
        "eval": EVAL,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size},
        "optim": {"lr": args.lr, "warmup_steps": 10, "weight_decay": 0.1, **extra.get("optim", {})},
        "finetune": extra.get("finetune", {}),
        "runtime": {"output_dir": str(WORK), "seed": 0, "feature_cache": CACHE, "progress": False},
    }
    started = time.perf_counter()
    out = cliptune.finetune(cfg)
    out["seconds"] = time.perf_counter() - started
    return out


def subsample(rows: int) -> Path:
    """The first `rows` images of the emoji training table (its order is already a seeded shuffle by title)."""
    lines = (ROOT / "data/emoji/train.csv").read_text().splitlines()
    target = WORK / f"emoji_train_{rows}.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines[: rows + 1]) + "\n")
    return target


def wise_of(run_dir: str, alphas: list[float]) -> dict[float, dict]:
    model = load_any(run_dir)
    suite = EvalSuite.from_config(resolve_config({"eval": EVAL}).eval)
    initial = load_initial(Path(run_dir) / INITIAL_FILE)
    return sweep(model, initial, alphas, lambda m: suite.run(Encoding(m, batch_size=128)))


def table(source: dict, rows: dict[str, dict], wise: dict[float, dict], best: str) -> str:
    before = source["emoji"]["mean_recall"], source["clipart"]["mean_recall"]
    lines = [
        "| strategy | trainable params | emoji mean recall (new domain) | clip-art mean recall (original) "
        "| forgotten on clip art | minutes |",
        "|---|---:|---:|---:|---:|---:|",
        f"| zero-shot (source model) | 0 | {before[0]:.2f} | {before[1]:.2f} | 0.00 | |",
    ]
    for name, out in rows.items():
        emoji, clip = out["final"]["emoji"]["mean_recall"], out["final"]["clipart"]["mean_recall"]
        lines.append(
            f"| {name} | {out['run']['trainable_parameters']:,} | {emoji:.2f} | {clip:.2f} | "
            f"{before[1] - clip:.2f} | {out['seconds'] / 60:.1f} |"
        )
    for alpha, res in wise.items():
        emoji, clip = res["emoji"]["mean_recall"], res["clipart"]["mean_recall"]
        lines.append(
            f"| WiSE-FT of {best}, alpha {alpha:.2f} | | {emoji:.2f} | {clip:.2f} | {before[1] - clip:.2f} | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--source-epochs", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="run only these strategies")
    parser.add_argument("--section", default="strategies", help="RESULTS.md section to write")
    parser.add_argument("--no-wise", action="store_true", help="skip the WiSE-FT sweep of the best strategy")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    shutil.rmtree(WORK, ignore_errors=True)  # every row is a fresh run; the feature cache lives elsewhere
    init = source_model(args.source_epochs)
    train_csv = subsample(args.train_images)
    rows = {}
    for name, extra in STRATEGIES.items():
        if args.only is None or name in args.only:
            rows[name] = run_strategy(name, extra, init, args, train_csv)
            print(name, {k: round(v["mean_recall"], 2) for k, v in rows[name]["final"].items()}, flush=True)
    source = next(iter(rows.values()))["baseline"]
    best = max(rows, key=lambda n: rows[n]["final"]["emoji"]["mean_recall"])
    wise = {} if args.no_wise else wise_of(rows[best]["run_dir"], [0.0, 0.25, 0.5, 0.75, 1.0])
    command = " ".join(f'"{a}"' if " " in a else a for a in sys.argv[1:])
    body = (
        f"`python benchmarks/strategies.py {command}` on "
        f"{machine()}.\n\nSource: lite0-minilm heads aligned on Open Clip Art ({args.source_epochs} epochs, "
        f"towers locked). Target: {args.train_images} Noto emoji training images, {args.epochs} epochs, "
        f"batch {args.batch_size}, lr {args.lr}, seed 0 for every row. Held-out sets: 378 emoji (new domain), "
        f"1011 clip-art images (original domain). Minutes are wall time on a 2-core machine that other jobs "
        "shared; the first row also fills the feature cache of the locked towers.\n\n" + table(source, rows, wise, best)
    )
    write_section(args.section, body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
