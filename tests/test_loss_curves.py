"""Pinned loss curves: seeded tiny runs whose first 20 training losses must equal the values stored in
`loss_curves.json`, so any change of numerics (a refactor that should change nothing, a new default) is seen and
has to be explained.

The stored values were recorded on the tree before the architecture refactor (issue 10), with
`CLIPTUNE_RECORD_LOSS_CURVES=1 pytest tests/test_loss_curves.py`; re-record the same way only for a change that is
meant to change training, and say why in the commit. Together the cases cover every place the refactor moved
knowledge to: layer-wise lr decay per backend (open_clip ViT, timm + BERT composed, HF SigLIP), LoRA on open_clip's
ResNet (weight-read attention pooling), prompts and heads with a cached locked tower, SigLIP's objective-owned bias,
FSC-CLIP's token features and negatives, FT-CLIP's class head and UniCL's groups.
"""

import csv
import json
import os
from pathlib import Path

import pytest
import torch

import cliptune
from cliptune.data.synthetic import SHAPES
from cliptune.train.logging import step_losses
from tests.helpers import save_tiny_siglip, tiny_config

STORED = Path(__file__).with_name("loss_curves.json")
RECORD = os.environ.get("CLIPTUNE_RECORD_LOSS_CURVES") == "1"
STEPS = 20

CASES: dict[str, dict] = {
    "clip-vit-layer-decay": {"optim": {"layer_decay_image": 0.7, "layer_decay_text": 0.8}},
    "siglip-rn-lora": {
        "model": {"arch": "cliptune-tiny-rn"},
        "loss": {"name": "siglip"},
        "finetune": {"lora": {"rank": 2}},
    },
    "prompts-heads-locked-image": {
        "finetune": {"prompt_tokens": 2, "heads": "mlp", "lock_image": True, "lock_text_patterns": "!ln_final"},
    },
    "fsc-tokens": {"loss": {"name": "fsc", "hard_negatives": 2, "tagger": "rules"}},
    "ce-labelled": {"loss": {"name": "ce"}, "labelled": True},
    "unicl-labelled": {"loss": {"name": "unicl"}, "labelled": True},
    "composed-layer-decay": {"composed": True, "optim": {"layer_decay_image": 0.7, "layer_decay_text": 0.8}},
    "hf-siglip-prompts-layer-decay": {
        "hf_siglip": True,
        "loss": {"name": "siglip"},
        "finetune": {"prompt_tokens": 2},
        "optim": {"layer_decay_image": 0.7, "layer_decay_text": 0.8},
    },
}


@pytest.fixture(scope="module")
def labels(shapes) -> Path:
    rows = list(csv.DictReader((shapes / "train.csv").open()))
    lines = []
    for row in rows:
        caption = json.loads(row["caption"])[0]
        lines.append(f"{row['image']}\t{next(s for s in SHAPES if s in caption)}")
    path = shapes / "curve-labels.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(case: dict, shapes: Path, out: Path, labels: Path, bert_dir: Path) -> dict:
    case = dict(case)
    cfg = {
        "name": "curve",
        "model": {"arch": "cliptune-tiny-vit"},
        "data": {"train": {"path": str(shapes / "train.csv")}},
        "train": {"epochs": 1, "batch_size": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 3},
        "runtime": {"output_dir": str(out), "progress": False, "seed": 0, "log_every": 1},
    }
    if case.pop("labelled", False):
        cfg["data"] = {"labelled": {"path": str(labels), "templates": ["a photo of a {}.", "a {} shape."]}}
    if case.pop("composed", False):
        cfg["model"] = cliptune.config.to_dict(tiny_config(bert_dir))
    if case.pop("hf_siglip", False):
        cfg["model"] = {"backend": "hf", "arch": str(save_tiny_siglip(out / "siglip"))}
    return cliptune.config.merge(cfg, case)


def _losses(run_dir: Path) -> list[float]:
    return step_losses(run_dir)[:STEPS]


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_losses_equal_the_stored_curve(name, shapes, labels, bert_dir, tmp_path):
    cliptune.finetune(_config(CASES[name], shapes, tmp_path, labels, bert_dir))
    losses = _losses(tmp_path / "curve")
    assert len(losses) == STEPS
    stored = json.loads(STORED.read_text()) if STORED.exists() else {}
    if RECORD:
        stored[name] = losses
        STORED.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    assert name in stored, f"no stored curve for {name}: record it (see the module docstring)"
    # Identical arithmetic in the same order gives identical floats; the tolerance only absorbs a summation
    # order a library may pick differently between builds, far below any change a refactor could make.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stored[name]), rtol=1e-6, atol=1e-7)
