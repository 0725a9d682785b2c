"""Training objectives and classification recipes on real offline data: what each gains and what it costs.

    make data/openclipart/manifest.json        # and: apt-get install dataset-fashion-mnist
    python benchmarks/objectives.py            # both parts: 24 min on 2 CPU cores, one torch thread, shared
    python benchmarks/objectives.py --quick    # tiny settings, a smoke run of every row (1-2 min); records nothing

Source model of both parts: lite0-minilm (EfficientNet-Lite0 + all-MiniLM-L6-v2, real pretrained towers) with its
projection heads aligned on Open Clip Art, towers locked (the quickstart recipe). The preset's heads start random, so
"zero-shot" below means this aligned model, evaluated before any of the rows train.

Part A, contrastive objectives (`--only objectives`): the source model fine-tuned on clip-art training images with
CLIP's InfoNCE, NegCLIP, FSC-CLIP and SigLIP; the same seed, images, batch, epochs and lr for every row. The image
trunk stays locked (its outputs cached); the last MiniLM layer and both projection heads train, so hard negatives can
move the text tower. Scored on held-out clip-art images: retrieval mean recall, compositionality accuracy (true title
ranked above its generated hard negatives: `build_compositionality_table`, spaCy + WordNet, seed 0) and zero-shot
clip-art categories.

Part B, classification (`--only classification`): a balanced Fashion-MNIST subset (Debian's dataset-fashion-mnist),
starting from the same source model: zero-shot, linear probe, FT-CLIP (cross-entropy through a zero-shot-initialised
head) and FLYP (contrastive on class prompts, UniCL targets), each also WiSE-FT-interpolated with its starting weights.
Scored by held-out Fashion-MNIST top-1, and by what each forgot: zero-shot top-1 on held-out clip-art categories.

Rows are evaluated here, once after training (the trainer's per-epoch evaluation would repeat the same zero-shot
evaluation in every row). Writes RESULTS.md sections "<section>: contrastive" and "<section>: classification".
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import cliptune
from cliptune.api import resolve_config
from cliptune.config import TableSpec, merge
from cliptune.data import read_caption_table
from cliptune.data.fashion_mnist import build_fashion_mnist
from cliptune.data.negatives import NegativeGenerator
from cliptune.eval import Encoding, EvalSuite
from cliptune.eval.compositionality import build_compositionality_table
from cliptune.features.store import FeatureStore, tower_fingerprint
from cliptune.inference import load_any
from cliptune.models import ClipModel
from cliptune.tuning.wise import INITIAL_FILE, load_initial, sweep

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
# efficientnet-lite's drop connect, which its library builds in: every recorded row that trains the source model's
# image tower was measured with it. model.drop_path sets it on every run (its default 0 turns it off), so it is set.
LITE_DROP_PATH = 0.2
CLIPART = ROOT / "data" / "openclipart"
CACHE = ROOT / "runs" / ".feature_cache"  # shared with the other benchmarks: the locked towers' outputs
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

# Eval set names: the keys of every results dict below.
RETRIEVAL, COMPOSITION, CATEGORIES, FASHION = "clipart-val", "clipart-val-negatives", "clipart-categories", "fashion"
CLIPART_TEMPLATES = ["clip art of {}.", "a drawing of {}.", "{}"]  # the quickstart's
FASHION_TEMPLATES = ["a photo of a {}.", "a product photo of a {}.", "a black and white photo of a {}."]
FASHION_SIZE = 64  # px on disk; the image tower's transform resizes to its own input size either way

# Part A. FSC-CLIP's local term needs patch and token features, which only OpenCLIP ViTs and HF CLIP give; a composed
# EfficientNet + MiniLM model pools inside its towers, so the term is off (cliptune refuses it with a ConfigError).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "CLIP (InfoNCE)": {"name": "clip"},
    "NegCLIP (+1 hard negative per caption)": {"name": "negclip"},
    "FSC-CLIP (global HN + focal/smoothing; no local term)": {"name": "fsc", "local_weight": 0.0},
    "SigLIP (sigmoid, bias -10)": {"name": "siglip"},
}
LAST_TEXT_LAYER = "!encoder.layer.5"  # all-MiniLM-L6-v2 has layers 0..5

# Part B.
EMA_DECAY = 0.9  # an average over the last ~10 steps: these runs take only a few dozen


def classifiers(lr: float) -> dict[str, dict[str, Any]]:
    """The classification recipes (config sections over `classifier_config`'s) at peak learning rate `lr`."""
    return {
        "linear probe": {
            "loss": {"name": "ce"},
            "finetune": {"lock_image": True, "lock_image_patterns": "!class_weights", "lock_text": True},
            # A composed model's projection heads are shared parameters, which the lock_* keys never lock: lr 0 for
            # the shared group (optim.lr) keeps them, so only the class head (the image tower's) moves.
            "optim": {"lr": 0.0, "lr_image": lr},
        },
        "FT-CLIP": {
            "loss": {"name": "ce"},
            "finetune": {"ema_decay": EMA_DECAY},
            "optim": {"lr": lr, "layer_decay_image": 0.65},
        },
        "FLYP": {
            "loss": {"name": "unicl"},  # 10 classes: plain InfoNCE would push apart a batch's many same-class pairs
            "finetune": {"ema_decay": EMA_DECAY},
            "optim": {"lr": lr, "layer_decay_image": 0.65, "layer_decay_text": 0.65},
        },
    }


@dataclass(frozen=True)
class Settings:
    """Sizes of one invocation; `quick` shrinks every one of them."""

    work: Path
    quick: bool = False  # the source model then aligns on the training sample only, Fashion-MNIST lives in `work`
    epochs: int = 1
    source_epochs: int = 10
    train_images: int | None = None  # Part A clip-art training images (None: all 4043)
    val_images: int | None = None  # Part A held-out clip-art images (None: all 1011)
    forget_images: int | None = 400  # Part B held-out clip-art images whose categories measure forgetting
    batch_size: int = 64  # Part A contrastive batch
    lr: float = 2e-4
    per_class_train: int = 100  # Fashion-MNIST
    per_class_test: int = 30
    class_batch_size: int = 16
    class_lr: float = 1e-3
    warmup_steps: int = 5
    wise_alpha: float = 0.5
    seed: int = 0


def settings_for(args: argparse.Namespace) -> Settings:
    work = ROOT / "runs" / ("bench-objectives-quick" if args.quick else "bench-objectives")
    if not args.quick:
        return Settings(work, epochs=args.epochs)
    return Settings(
        work,
        quick=True,
        epochs=args.epochs,
        source_epochs=1,
        train_images=64,
        val_images=48,
        forget_images=48,
        batch_size=16,
        per_class_train=4,
        per_class_test=3,
        warmup_steps=0,  # a handful of steps: a warm-up would leave the weights where they started
    )


# ---------------------------------------------------------------------------------------------------------------
# Data


def sample_rows(source: Path, rows: int | None, out: Path, seed: int = 0) -> Path:
    """A CSV table with `rows` of its data rows drawn at random (seeded), in their original order; all: the source.

    The clip-art tables are sorted by category, so the first rows would all be animals."""
    if rows is None:
        return source
    with source.open(newline="", encoding="utf-8") as f:
        header, *body = list(csv.reader(f))
    if rows > len(body):
        raise ValueError(f"{source}: {rows} rows asked for but it has {len(body)}; ask for fewer images")
    keep = sorted(random.Random(seed).sample(range(len(body)), rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *(body[i] for i in keep)])
    return out


def restrict_list(source: Path, table: Path, out: Path) -> Path:
    """The lines of a `path<TAB>label` list whose image is also in `table`, with paths made absolute."""
    with table.open(newline="", encoding="utf-8") as f:
        wanted = {row["image"] for row in csv.DictReader(f)}
    lines = [line.split("\t", 1) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [f"{source.parent / path}\t{label}\n" for path, label in lines if path in wanted]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(kept), encoding="utf-8")
    return out


@dataclass(frozen=True)
class ClipArt:
    """The clip-art tables of a run: training, held-out retrieval with its categories and compositionality table,
    and the categories of a sample of the held-out images (Part B's forgetting set)."""

    train: Path
    val: Path
    categories: Path
    negatives: Path
    forgetting: Path

    def table(self, path: Path) -> dict[str, str]:
        return {"path": str(path), "images_root": str(CLIPART)}


def prepare_clipart(s: Settings) -> ClipArt:
    train = sample_rows(CLIPART / "train.csv", s.train_images, s.work / "clipart_train.csv", s.seed)
    val = sample_rows(CLIPART / "val.csv", s.val_images, s.work / "clipart_val.csv", s.seed)
    categories = restrict_list(CLIPART / "val_classes.txt", val, s.work / "clipart_categories.txt")
    held_out = read_caption_table(TableSpec(path=str(val), images_root=str(CLIPART)))
    negatives = build_compositionality_table(
        held_out, s.work / "clipart_val_negatives.jsonl", NegativeGenerator(tagger="auto"), count=3, seed=s.seed
    )
    sample = sample_rows(CLIPART / "val.csv", s.forget_images, s.work / "clipart_forget.csv", s.seed)
    forgetting = restrict_list(CLIPART / "val_classes.txt", sample, s.work / "clipart_forget_categories.txt")
    return ClipArt(train, val, categories, negatives, forgetting)


def eval_sets(data: ClipArt, fashion_test: Path | None = None) -> dict[str, Any]:
    """The `eval` section of Part A (no Fashion-MNIST) or Part B (Fashion-MNIST and the clip-art categories)."""
    categories = {"name": CATEGORIES, "path": str(data.categories), "templates": CLIPART_TEMPLATES}
    if fashion_test is not None:
        fashion = {"name": FASHION, "path": str(fashion_test), "templates": FASHION_TEMPLATES}
        return {"zeroshot": [fashion, {**categories, "path": str(data.forgetting)}], "batch_size": 128}
    return {
        "retrieval": [{"name": RETRIEVAL, **data.table(data.val)}],
        "compositionality": [{"name": COMPOSITION, "path": str(data.negatives)}],
        "zeroshot": [categories],
        "batch_size": 128,
    }


# ---------------------------------------------------------------------------------------------------------------
# Runs


def runtime(s: Settings) -> dict[str, Any]:
    return {"output_dir": str(s.work), "seed": s.seed, "feature_cache": str(CACHE), "progress": False}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.split(" (")[0]).strip("_").lower()


def source_model(s: Settings, data: ClipArt) -> str:
    """The quickstart recipe on the full clip-art training table (a sample with --quick); returns its run dir."""
    train = data.table(data.train if s.quick else CLIPART / "train.csv")
    out = cliptune.finetune(
        QUICKSTART,
        name="source",
        data={"train": train},
        eval={"retrieval": [], "zeroshot": []},  # evaluated by this script, on its own sets
        train={"epochs": s.source_epochs},
        runtime=runtime(s),
    )
    return out["run_dir"]


def objective_config(label: str, loss: dict[str, Any], init: str, s: Settings, data: ClipArt) -> dict[str, Any]:
    return {
        "name": slug(label),
        "model": {"init": init, "drop_path": LITE_DROP_PATH},
        "data": {"train": data.table(data.train)},
        "loss": loss,
        "finetune": {"lock_image": True, "lock_text": True, "lock_text_patterns": LAST_TEXT_LAYER},
        "train": {"epochs": s.epochs, "batch_size": s.batch_size},
        "optim": {"lr": s.lr, "warmup_steps": s.warmup_steps, "weight_decay": 0.1},
        "runtime": runtime(s),
    }


def classifier_config(label: str, recipe: dict[str, Any], init: str, s: Settings, fashion_train: Path) -> dict:
    base = {
        "name": slug(label),
        "model": {"init": init, "drop_path": LITE_DROP_PATH},
        "data": {"labelled": {"name": "fashion-train", "path": str(fashion_train), "templates": FASHION_TEMPLATES}},
        "train": {"epochs": s.epochs, "batch_size": s.class_batch_size},
        "optim": {"warmup_steps": s.warmup_steps, "weight_decay": 0.1},
        "runtime": runtime(s),
    }
    return merge(base, recipe)


class Evaluator:
    """Scores models on one EvalSuite; an image trunk identical to the source's is read from the feature cache."""

    def __init__(self, eval_section: dict[str, Any], source: ClipModel) -> None:
        self.suite = EvalSuite.from_config(resolve_config({"eval": eval_section}).eval)
        self.source_trunk = tower_fingerprint(source, "image")

    def __call__(self, model: ClipModel) -> dict[str, dict[str, float]]:
        # The fingerprint covers weights, buffers and transform: a fine-tuned trunk is encoded afresh, not cached.
        unchanged = tower_fingerprint(model, "image") == self.source_trunk
        store = FeatureStore(CACHE) if unchanged else None
        return self.suite.run(Encoding(model, batch_size=128, cached=["image"] if unchanged else [], store=store))


def train_and_score(cfg: dict[str, Any], evaluate: Evaluator, wise_alpha: float | None = None) -> dict[str, Any]:
    """Fine-tune, then evaluate the final model (and its WiSE-FT interpolation); times the whole row."""
    started = time.perf_counter()
    out = cliptune.finetune(cfg)
    model = load_any(out["run_dir"])
    initial = load_initial(Path(out["run_dir"]) / INITIAL_FILE)
    row = {
        "final": evaluate(model),
        "trained": changed_parameters(model, initial),
        "train_images": out["run"]["train_images"],
    }
    if wise_alpha is not None:
        row["wise"] = sweep(model, initial, [wise_alpha], evaluate)[wise_alpha]
    row["seconds"] = time.perf_counter() - started
    return row


def changed_parameters(model: torch.nn.Module, initial: dict[str, torch.Tensor], rtol: float = 1e-6) -> int:
    """Elements of the parameter tensors that training changed: what really trained, unlike requires_grad, which also
    counts parameters at lr 0 and ones the objective never reaches (a ce model's text projection). Changes within
    `rtol` of every element are rounding, not training: the EMA's float arithmetic moves a parameter that never gets
    a gradient by an ulp or so. Buffers (BatchNorm statistics) are not parameters, even where they moved."""
    params = dict(model.named_parameters())
    return sum(
        start.numel()
        for name, start in initial.items()
        if name in params and not torch.allclose(params[name].detach().float(), start.float(), rtol=rtol, atol=0.0)
    )


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Tables


def delta(value: float, before: float) -> str:
    return f"{value:.2f} ({value - before:+.2f})"


def objectives_table(zero_shot: dict[str, dict[str, float]], rows: dict[str, dict[str, Any]]) -> str:
    """Markdown rows: each objective's held-out scores, with its change from the zero-shot model in brackets."""
    metrics = [(RETRIEVAL, "mean_recall"), (RETRIEVAL, "i2t_R@1"), (RETRIEVAL, "t2i_R@1")]
    metrics += [(COMPOSITION, "accuracy"), (CATEGORIES, "acc1")]
    lines = [
        "| objective | parameters trained | retrieval mean recall | i2t R@1 | t2i R@1 | compositionality accuracy "
        "| clip-art categories top-1 | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| zero-shot (source model) | 0 | " + " | ".join(f"{zero_shot[s][m]:.2f}" for s, m in metrics) + " | |",
    ]
    for label, row in rows.items():
        cells = " | ".join(delta(row["final"][s][m], zero_shot[s][m]) for s, m in metrics)
        lines.append(f"| {label} | {row['trained']:,} | {cells} | {row['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def classification_table(zero_shot: dict[str, dict[str, float]], rows: dict[str, dict[str, Any]], alpha: float) -> str:
    """Markdown rows: Fashion-MNIST top-1 and clip-art categories top-1 (and what was lost) per method and WiSE-FT."""

    def cells(results: dict[str, dict[str, float]]) -> str:
        fashion, clipart = results[FASHION]["acc1"], results[CATEGORIES]["acc1"]
        return f"{fashion:.2f} | {clipart:.2f} | {zero_shot[CATEGORIES]['acc1'] - clipart:.2f}"

    lines = [
        "| method | parameters trained | Fashion-MNIST top-1 | clip-art categories top-1 | forgotten (top-1 lost) "
        "| minutes |",
        "|---|---:|---:|---:|---:|---:|",
        f"| zero-shot (source model) | 0 | {cells(zero_shot)} | |",
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['trained']:,} | {cells(row['final'])} | {row['seconds'] / 60:.1f} |")
        if "wise" in row:
            lines.append(f"| {label} + WiSE-FT (alpha {alpha:g}) | | {cells(row['wise'])} | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The two parts


def run_objectives(s: Settings, data: ClipArt, init: str, source: ClipModel) -> str:
    evaluate = Evaluator(eval_sets(data), source)
    started = time.perf_counter()
    zero_shot = evaluate(source)
    say(f"[objectives] zero-shot: {headline(zero_shot)} ({(time.perf_counter() - started) / 60:.1f} min)")
    rows = {}
    for label, loss in OBJECTIVES.items():
        say(f"[objectives] {label}: training")
        rows[label] = train_and_score(objective_config(label, loss, init, s, data), evaluate)
        say(f"[objectives] {label}: {headline(rows[label]['final'])} ({rows[label]['seconds'] / 60:.1f} min)")
    suite = evaluate.suite
    sizes = (next(iter(rows.values()))["train_images"], len(suite.retrieval[0]), len(suite.compositionality[0]))
    return objectives_notes(s, *sizes) + "\n\n" + objectives_table(zero_shot, rows)


def objectives_notes(s: Settings, train_images: int, held_out: int, composition: int) -> str:
    return (
        f"Fine-tuning: {train_images} clip-art training images, {s.epochs} epoch(s), batch {s.batch_size}, peak lr "
        f"{s.lr} (cosine), seed {s.seed} for every row. Trainable: the last MiniLM layer, both projection heads and "
        "the temperature (and SigLIP's bias); the image trunk is locked and cached. Held out: "
        f"{held_out} clip-art images for retrieval and for their categories; {composition} of their titles, each "
        "with up to 3 generated hard negatives (span swaps, WordNet replacements, shuffles; spaCy tagger, seed "
        f"{s.seed}), for compositionality (the true title must score above all of its negatives). FSC-CLIP runs "
        "without its local (token-level) term: EfficientNet and MiniLM pool inside their towers and give no patch or "
        "token features. NegCLIP and FSC-CLIP generate their training negatives the same way. Brackets: change from "
        "zero-shot."
    )


def run_classification(s: Settings, data: ClipArt, init: str, source: ClipModel) -> str:
    fashion_dir = s.work / "fashion" if s.quick else ROOT / "data" / "fashion"
    fashion = build_fashion_mnist(fashion_dir, s.per_class_train, s.per_class_test, s.seed, FASHION_SIZE)
    evaluate = Evaluator(eval_sets(data, fashion["test"]), source)
    started = time.perf_counter()
    zero_shot = evaluate(source)
    say(f"[classification] zero-shot: {headline(zero_shot)} ({(time.perf_counter() - started) / 60:.1f} min)")
    rows = {}
    for label, recipe in classifiers(s.class_lr).items():
        say(f"[classification] {label}: training")
        cfg = classifier_config(label, recipe, init, s, fashion["train"])
        rows[label] = train_and_score(cfg, evaluate, s.wise_alpha)
        say(f"[classification] {label}: {headline(rows[label]['final'])} ({rows[label]['seconds'] / 60:.1f} min)")
    forgetting_images = len(evaluate.suite.zeroshot[1][0])
    return classification_notes(s, forgetting_images) + "\n\n" + classification_table(zero_shot, rows, s.wise_alpha)


def classification_notes(s: Settings, forgetting_images: int) -> str:
    prompts = ", ".join(repr(t) for t in FASHION_TEMPLATES)
    return (
        f"Fashion-MNIST: {s.per_class_train} training and {s.per_class_test} held-out test images per class "
        f"(10 classes, {FASHION_SIZE} px, seeded), prompts {prompts}. Every row: {s.epochs} epoch(s), batch "
        f"{s.class_batch_size}, peak lr {s.class_lr} (cosine), seed {s.seed}. Linear probe: loss ce; only the "
        "zero-shot-initialised class head trains: image tower locked, projection heads at lr 0 (shared parameters, "
        "which locking does not reach). FT-CLIP: loss ce (label smoothing 0.1) through the same head; image tower, "
        f"its projection and the head train; layer decay 0.65, EMA {EMA_DECAY}. FLYP: loss unicl on (image, class "
        f"prompt) pairs; both towers train; layer decay 0.65, EMA {EMA_DECAY}. WiSE-FT: alpha {s.wise_alpha:g} "
        "between the source and the fine-tuned weights. Forgotten: zero-shot top-1 lost on "
        f"{forgetting_images} held-out clip-art images (20 categories, the quickstart's prompts), the domain the "
        "source model was aligned on. Parameters trained: elements of the parameter tensors that changed."
    )


def headline(results: dict[str, dict[str, float]]) -> str:
    keys = ("mean_recall", "accuracy", "acc1")
    return ", ".join(f"{name} {next(v[k] for k in keys if k in v):.2f}" for name, v in results.items())


# --only name -> (RESULTS.md section suffix, the part)
PARTS = {"objectives": ("contrastive", run_objectives), "classification": ("classification", run_classification)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(PARTS), help="run one part only")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run); writes no results")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every fine-tuning row")
    parser.add_argument("--section", default="objectives", help="RESULTS.md section prefix")
    parser.add_argument("--no-write", action="store_true", help="print the tables only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    s = settings_for(args)
    shutil.rmtree(s.work, ignore_errors=True)  # every row is a fresh run; the feature cache lives elsewhere
    started = time.perf_counter()
    data = prepare_clipart(s)
    init = source_model(s, data)
    source = load_any(init)
    source_minutes = (time.perf_counter() - started) / 60
    say(f"source model: {source_minutes:.1f} min")
    command = shlex.join(["python", "benchmarks/objectives.py", *(sys.argv[1:] if argv is None else argv)])
    header = (
        f"`{command}` on {machine()}.\n\nSource model: lite0-minilm heads aligned on Open Clip Art "
        f"({s.source_epochs} epochs, towers locked; {source_minutes:.1f} min with the feature cache of earlier runs). "
        "Minutes: wall time of the row (training and its evaluation) on "
        "a machine other jobs may share.\n\n"
    )
    for part, (title, run) in PARTS.items():
        if args.only not in (None, part):
            continue
        part_started = time.perf_counter()
        body = header + run(s, data, init, source)
        body += f"\n\nWall time of this part: {(time.perf_counter() - part_started) / 60:.1f} min."
        name = f"{args.section}: {title}"
        if not (args.quick or args.no_write):
            write_section(name, body)
        say(f"\n## {name}\n\n{body}\n")
    say(f"total: {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
