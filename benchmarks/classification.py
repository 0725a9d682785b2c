"""Classification fine-tuning recipes on a real offline labelled set: what each gains and what it forgets.

    make data/openclipart/manifest.json        # and: apt-get install dataset-fashion-mnist
    python benchmarks/classification.py        # 45 min on 2 CPU cores shared with other jobs (2026-12-02)
    python benchmarks/classification.py --quick   # tiny settings, a smoke run of every row; records nothing

Source model: lite0-minilm (EfficientNet-Lite0 + all-MiniLM-L6-v2, real pretrained towers) with its projection heads
aligned on Open Clip Art, towers locked (the quickstart recipe, as in `benchmarks/objectives.py`, whose source run
and Fashion-MNIST sample this script shares). Target: a balanced Fashion-MNIST subset (Debian's
dataset-fashion-mnist). Rows, every one from the same source weights with the same seed, images, batch, epochs and
peak lr:

- zero-shot: the source model's class prompts.
- linear probe: only the zero-shot-initialised class head trains (loss ce, image tower locked).
- FT-CLIP, recipe optimisation: loss ce through that head, the image tower trains with the seed's layer decay 0.6,
  weight decay 0.05 and label smoothing 0.1; the model's own mild training crop; no EMA.
- FT-CLIP + augmentation + EMA: the same plus the seed's training pipeline (`data.augment`: random-resized crop
  0.08-1, flip 0.5, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) and EMA of the weights.
- FLYP: contrastive on (image, class prompt) pairs with label-aware targets (UniCL); both towers train.

Each trained row is also scored WiSE-FT-interpolated halfway to its starting weights. Scored by Fashion-MNIST test
top-1 and by what was forgotten on the source domain: zero-shot top-1 lost on held-out clip-art categories. Writes
the RESULTS.md section "classification".
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from cliptune.data.fashion_mnist import build_fashion_mnist
from cliptune.inference import load_any
from cliptune.utils.memory import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section
from objectives import (
    CATEGORIES,
    CLIPART,
    CLIPART_TEMPLATES,
    FASHION,
    FASHION_SIZE,
    FASHION_TEMPLATES,
    LITE_DROP_PATH,
    QUICKSTART,
    ROOT,
    Evaluator,
    Settings,
    classification_table,
    classifier_config,
    headline,
    restrict_list,
    runtime,
    sample_rows,
    say,
    train_and_score,
)

import cliptune

EMA_DECAY = 0.9  # an average over the last ~10 steps: these runs take only a few dozen (the seed's 0.9998 spans 5k)
SEED_OPTIM = {"layer_decay_image": 0.6, "weight_decay": 0.05}  # FT-CLIP's; loss.label_smoothing 0.1 is the default
SEED_AUGMENT = {
    "scale": [0.08, 1.0],
    "hflip": 0.5,
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "interpolation": "bicubic",
    "re_prob": 0.25,
}


def recipes(lr: float) -> dict[str, dict[str, Any]]:
    """Config sections of every trained row, over `objectives.classifier_config`'s, at peak learning rate `lr`."""
    ft_clip = {"loss": {"name": "ce", "label_smoothing": 0.1}, "optim": {"lr": lr, **SEED_OPTIM}}
    return {
        "linear probe": {
            "loss": {"name": "ce"},
            "finetune": {"lock_image": True, "lock_image_patterns": "!class_weights", "lock_text": True},
            # The composed model's projection heads are shared parameters that locking never reaches: lr 0 for
            # the shared group keeps them, so only the class head (the image tower's) moves.
            "optim": {"lr": 0.0, "lr_image": lr},
        },
        "FT-CLIP (recipe optimisation, model's own crop)": ft_clip,
        "FT-CLIP + augmentation + EMA": {
            **ft_clip,
            "data": {"augment": SEED_AUGMENT},
            "finetune": {"ema_decay": EMA_DECAY},
        },
        "FLYP (contrastive on class prompts, label-aware)": {
            "loss": {"name": "unicl"},
            "optim": {"lr": lr, "layer_decay_image": 0.6, "layer_decay_text": 0.6},
        },
    }


def settings_for(args: argparse.Namespace) -> Settings:
    work = ROOT / "runs" / ("bench-classification-quick" if args.quick else "bench-classification")
    s = Settings(work, epochs=args.epochs, per_class_train=args.per_class, per_class_test=30, class_batch_size=16)
    if not args.quick:
        return s
    small = {"source_epochs": 1, "train_images": 64, "forget_images": 48, "per_class_train": 4, "per_class_test": 3}
    return replace(s, quick=True, warmup_steps=0, **small)


def source_model(s: Settings) -> str:
    """The quickstart recipe on the clip-art training table (a sample with --quick); returns its run directory."""
    train = sample_rows(CLIPART / "train.csv", s.train_images, s.work / "clipart_train.csv", s.seed)
    out = cliptune.finetune(
        QUICKSTART,
        name="source",
        data={"train": {"path": str(train), "images_root": str(CLIPART)}},
        eval={"retrieval": [], "zeroshot": []},  # evaluated by this script, on its own sets
        train={"epochs": s.source_epochs},
        runtime=runtime(s),
    )
    return out["run_dir"]


def eval_section(s: Settings, fashion_test: Path) -> dict[str, Any]:
    """Fashion-MNIST test top-1, and the categories of a sample of held-out clip-art images (the forgetting set)."""
    sample = sample_rows(CLIPART / "val.csv", s.forget_images, s.work / "clipart_forget.csv", s.seed)
    forgetting = restrict_list(CLIPART / "val_classes.txt", sample, s.work / "clipart_forget_categories.txt")
    return {
        "zeroshot": [
            {"name": FASHION, "path": str(fashion_test), "templates": FASHION_TEMPLATES},
            {"name": CATEGORIES, "path": str(forgetting), "templates": CLIPART_TEMPLATES},
        ],
        "batch_size": 128,
    }


def notes(s: Settings, forgetting_images: int) -> str:
    augment = ", ".join(f"{k} {v}" for k, v in SEED_AUGMENT.items())
    return (
        f"Fashion-MNIST: {s.per_class_train} training and {s.per_class_test} test images per class (10 classes, "
        f"{FASHION_SIZE} px, seeded), prompts {', '.join(repr(t) for t in FASHION_TEMPLATES)}. Every row: "
        f"{s.epochs} epoch(s), batch {s.class_batch_size}, peak lr {s.class_lr} (cosine after {s.warmup_steps} "
        f"warm-up steps), seed {s.seed}. FT-CLIP rows: layer decay 0.6, weight decay 0.05, label smoothing 0.1 (the "
        f"seed's); the augmented row adds data.augment ({augment}) and EMA {EMA_DECAY}. FLYP: layer decay 0.6 on "
        f"both towers, no EMA; linear probe and FLYP: weight decay 0.1. WiSE-FT: alpha {s.wise_alpha:g} between the "
        f"source and the fine-tuned weights. Forgotten: zero-shot top-1 lost on {forgetting_images} held-out "
        "clip-art images (20 categories), the source model's domain. Rows that train the image tower train it with "
        f"efficientnet-lite's drop connect {LITE_DROP_PATH} (its library's default; model.drop_path). Parameters "
        "trained: elements of the parameter tensors that changed."
    )


def run(s: Settings, init: str) -> str:
    fashion_dir = s.work / "fashion" if s.quick else ROOT / "data" / f"fashion-{s.per_class_train}-{s.per_class_test}"
    fashion = build_fashion_mnist(fashion_dir, s.per_class_train, s.per_class_test, s.seed, FASHION_SIZE)
    source = load_any(init)
    evaluate = Evaluator(eval_section(s, fashion["test"]), source)
    zero_shot = evaluate(source)
    say(f"zero-shot: {headline(zero_shot)}")
    rows = {}
    for label, recipe in recipes(s.class_lr).items():
        say(f"{label}: training")
        rows[label] = train_and_score(classifier_config(label, recipe, init, s, fashion["train"]), evaluate, 0.5)
        say(f"{label}: {headline(rows[label]['final'])} ({rows[label]['seconds'] / 60:.1f} min)")
    forgetting_images = len(evaluate.suite.zeroshot[1][0])
    return notes(s, forgetting_images) + "\n\n" + classification_table(zero_shot, rows, s.wise_alpha)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run); writes no results")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every fine-tuning row")
    parser.add_argument("--per-class", type=int, default=50, help="Fashion-MNIST training images per class")
    parser.add_argument("--section", default="classification", help="RESULTS.md section name")
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the CLI does: CPU convolutions page-fault far less (see cliptune.utils.memory)
    logging.disable(logging.INFO)
    s = settings_for(args)
    shutil.rmtree(s.work, ignore_errors=True)  # every row is a fresh run; the feature cache lives elsewhere
    started = time.perf_counter()
    init = source_model(s)
    source_minutes = (time.perf_counter() - started) / 60
    say(f"source model: {source_minutes:.1f} min")
    body = run(s, init)
    command = shlex.join(["python", "benchmarks/classification.py", *(sys.argv[1:] if argv is None else argv)])
    header = (
        f"`{command}` on {machine()}, other jobs sharing the CPU.\n\nSource model: lite0-minilm heads aligned on "
        f"Open Clip Art ({s.source_epochs} epochs, towers locked; {source_minutes:.1f} min, with the feature cache "
        "of earlier runs where there was one). Minutes: wall time of the row (training and its "
        "evaluation).\n\n"
    )
    body = header + body + f"\n\nTotal wall time: {(time.perf_counter() - started) / 60:.1f} min."
    if not (args.quick or args.no_write):
        write_section(args.section, body)
    say(f"\n## {args.section}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
