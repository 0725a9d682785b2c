"""Runs that select, stop and resume: best-weights selection, early stopping, eval / checkpoint cadence, mid-epoch
kill and resume, validation sets and the validation split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cliptune
from cliptune.config import ConfigError, TableSpec, build
from cliptune.data import read_caption_table
from cliptune.eval import EvalSuite
from cliptune.eval.retrieval import validation_loss
from cliptune.models.checkpoints import latest_checkpoint
from cliptune.train import runs
from cliptune.train.data import split_validation
from cliptune.train.logging import epoch_text
from cliptune.train.selection import Selection
from tests.helpers import run_config, write_yaml

STEPS_PER_EPOCH = 6  # 96 shapes images, batches of 16


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_selection_keeps_the_strict_best_and_stops_on_min_delta():
    """Lightning's rules: a tie is not a new best; early stopping needs more than min_delta over its reference."""
    sel = Selection("val/loss", "min", patience=2, min_delta=0.1)
    values = [1.0, 0.95, 0.95, 0.9]
    improved = [sel.update({"val": {"loss": v}}, epoch=i + 1, step=10 * (i + 1)) for i, v in enumerate(values[:3])]
    assert improved == [True, True, False]
    assert (sel.best.step, sel.best.value) == (20, 0.95)
    assert sel.stopped is not None and sel.stopped["step"] == 30, "0.95 and 0.95 are not 0.1 below 1.0"
    assert "did not improve by more than 0.1 in 2" in sel.stopped["reason"]
    restored = Selection("val/loss", "min", patience=2, min_delta=0.1)
    restored.load_state_dict(json.loads(json.dumps(sel.state_dict())))
    assert restored.state_dict() == sel.state_dict()
    with pytest.raises(ConfigError, match="has no metric 'loss'; it has acc1"):
        sel.value({"val": {"acc1": 1.0}})


def test_config_names_the_selection_set_and_the_cadence():
    with pytest.raises(ConfigError, match="names no eval set; the sets are val"):
        build({"eval": {"retrieval": [{"name": "val", "path": "v.csv"}]}, "train": {"select": {"metric": "x/acc1"}}})
    with pytest.raises(ConfigError, match=r"eval\.every_steps: 0 must be >= 1"):
        build({"eval": {"every_steps": 0}})
    cfg = build({"eval": {"validation": ["a.csv", {"path": "classes.txt"}]}, "train": {"keep_checkpoints": 0}})
    assert [type(s).__name__ for s in cfg.eval.validation] == ["TableSpec", "ZeroShotSpec"]


SCRIPT = [5.0, 10.0, 30.0, 25.0, 30.0, 29.0, 28.0, 50.0, 60.0]  # baseline, then after each epoch


@pytest.fixture
def scripted_eval(monkeypatch):
    """The eval sets report a known sequence of mean recalls; training and selection run for real."""
    calls = []

    def run(self, encoding, loss_batch=None):
        if not self.retrieval:
            return {}
        calls.append(len(calls))
        return {"val": {"mean_recall": SCRIPT[len(calls) - 1], "i2t_R@1": 0.0}}

    monkeypatch.setattr(EvalSuite, "run", run)
    return calls


@pytest.mark.slow
def test_best_weights_are_the_model_and_early_stopping_ends_the_run(shapes, tmp_path, scripted_eval):
    cfg = run_config(shapes, tmp_path, epochs=8, train__keep_checkpoints=10, train__early_stopping={"patience": 3})
    out = cliptune.finetune(cfg)
    run = Path(out["run_dir"])
    sel = out["selection"]
    # best 30 after epoch 2 (the tie at epoch 4 is not better); 25, 30, 29 do not beat 30: stop after epoch 5
    assert sel["best"] == {"epoch": 2, "step": 2 * STEPS_PER_EPOCH, "value": 30.0}
    assert sel["last"] == {"epoch": 5, "step": 5 * STEPS_PER_EPOCH, "value": 29.0}
    assert sel["stopped"]["epoch"] == 5 and out["run"]["epochs"] == 5 and len(scripted_eval) == 6
    assert out["final"]["val"]["mean_recall"] == 30.0 and out["last"]["val"]["mean_recall"] == 29.0
    saved, best = _weights(run / "model"), _weights(run / "checkpoints" / "epoch_2")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    assert not all(torch.equal(saved[k], v) for k, v in _weights(run / "checkpoints" / "epoch_5").items())
    summary = (run / "summary.md").read_text()
    assert "| selected (model/) | 2 | 12 | 30 |" in summary and "| last | 5 | 30 | 29 |" in summary
    assert "Early stopping at epoch 5, step 30" in summary and "selection metric is on a reported set" in summary
    # a stopped run, resumed, finishes without training on
    again = cliptune.finetune(cfg, resume=True)
    assert again["run"]["steps"] == 5 * STEPS_PER_EPOCH and again["selection"]["best"] == sel["best"]


KILLER = """
import os, signal, sys
import cliptune.train.loop as loop

real_step = loop.train_step


def train_step(trainer, batch):
    loss = real_step(trainer, batch)
    if trainer.state.step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss


loop.train_step = train_step
from cliptune.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _cadence_config(shapes: Path, out: Path) -> dict:
    return run_config(
        shapes,
        out,
        epochs=3,
        eval__every_steps=5,
        train__checkpoint_every_steps=3,
        finetune__ema_decay=0.9,
        runtime__log_every=1,
        data__validation_split=0.2,
    )


@pytest.mark.slow
def test_mid_epoch_sigkill_resumes_to_the_uninterrupted_weights(shapes, tmp_path):
    """Killed (SIGKILL) at step 11, after an evaluation at step 10 that the last checkpoint (step 9) has not seen."""
    whole = cliptune.finetune(_cadence_config(shapes, tmp_path / "whole"))
    whole_dir = Path(whole["run_dir"])
    assert whole["run"]["steps"] == 12, "4 steps per epoch: 76 training images after the validation split"
    evals = [(r["epoch"], r["step"]) for r in _records(whole_dir / "metrics.jsonl")]
    # epoch = step / 4 in every record (Hugging Face Trainer's fractional epoch): 1.25 is a quarter into the second
    assert evals[::2] == [(0, 0), (1.25, 5), (2.5, 10), (3, 12)], "validation and val, every 5 steps and at the end"
    evals = evals[::2]
    assert list(whole["per_epoch"]) == ["0", "2", "3"], "the last evaluation within each epoch"

    config = write_yaml(_cadence_config(shapes, tmp_path / "cut"), tmp_path / "c.yaml")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.replace("{kill_at}", "11"))
    # one thread, as in this process (conftest): another thread count sums in another order
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(killer), "train", str(config)], capture_output=True, text=True, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = tmp_path / "cut" / "run"
    assert latest_checkpoint(run / "checkpoints").name == "epoch_2_step_9"  # one batch into the third epoch
    resumed = subprocess.run(
        [sys.executable, "-m", "cliptune.cli", "train", str(config), "--resume"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "epoch_2_step_9" in resumed.stderr

    results = json.loads((run / "results.json").read_text())
    assert results["final"] == whole["final"] and results["selection"] == whole["selection"]
    for folder in ("model", "model_raw"):
        a, b = _weights(whole_dir / folder), _weights(run / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder

    def losses(path: Path) -> list[tuple]:
        keys = ("step", "epoch", "loss", "epoch_mean_loss", "val_loss/validation")
        return [tuple(r.get(k) for k in keys) for r in _records(path)]

    assert sum(1 for *_, val in losses(run / "train.jsonl") if val is not None) == len(evals)

    assert losses(run / "train.jsonl") == losses(whole_dir / "train.jsonl"), "replayed steps logged twice or differ"
    assert [(r["step"], r["epoch"], r["eval"]) for r in _records(run / "metrics.jsonl")] == [
        (r["step"], r["epoch"], r["eval"]) for r in _records(whole_dir / "metrics.jsonl")
    ], "the resumed run numbers its evaluations as the uninterrupted one"
    _same_epoch_at_each_step(run)
    summary = (run / "summary.md").read_text()
    best = results["selection"]["best"]
    assert f"| selected (model/) | {epoch_text(best['epoch'])} | {best['step']} |" in summary
    assert "| last | 3 | 12 |" in summary and best["epoch"] == best["step"] / 4
    row = runs.run_row(run)
    assert row.epochs == "3/3" and f"(e{epoch_text(best['epoch'])} s{best['step']})" in row.selected


def _same_epoch_at_each_step(run: Path) -> None:
    """Every train.jsonl record (step losses, epoch means, validation losses) and every evaluation at a step carry
    one epoch, step / steps per epoch, whether the evaluation is mid-epoch or at an epoch's end."""
    records = _records(run / "train.jsonl") + _records(run / "metrics.jsonl")
    epochs: dict[int, set] = {}
    for r in records:
        epochs.setdefault(r["step"], set()).add(r["epoch"])
    assert {s: e for s, e in epochs.items() if s in (5, 10, 12)} == {5: {1.25}, 10: {2.5}, 12: {3.0}}
    assert all(e == {round(s / 4, 4)} for s, e in epochs.items()), epochs


@pytest.mark.slow
def test_keep_checkpoints_zero_and_evaluation_every_two_epochs(shapes, tmp_path, caplog):
    cfg = run_config(shapes, tmp_path, epochs=3, train__keep_checkpoints=0, eval__every_epochs=2)
    out = cliptune.finetune(cfg)
    folder = Path(out["run_dir"]) / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["best"], "only the selected weights are kept"
    assert "cannot be resumed" in caplog.text
    assert [e["epoch"] for e in out["evaluations"]] == [0, 2, 3], "every 2 epochs, and the end"


@pytest.mark.slow
def test_wise_select_picks_the_alpha_best_on_validation(shapes, tmp_path):
    from cliptune.tuning.wise import interpolate

    wise = {"eval__wise_alphas": [0.0, 0.5, 1.0], "eval__wise_select": True}
    cfg = run_config(shapes, tmp_path, epochs=2, data__validation_split=0.25, **wise)
    out = cliptune.finetune(cfg)
    run = Path(out["run_dir"])
    value = {float(a): r["validation"]["mean_recall"] for a, r in out["wise"].items()}
    alpha = max(value, key=lambda a: (value[a], a))
    assert out["selection"]["metric"] == "validation/mean_recall" and out["selection"]["wise_alpha"] == alpha
    assert out["final"] == out["wise"][str(alpha)]
    best = _weights(run / "checkpoints" / "best")
    expected = interpolate(load_file(str(run / "initial.safetensors")), best, alpha)
    saved = _weights(run / "model")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert f"WiSE-FT: model/ is alpha {alpha:g}" in (run / "summary.md").read_text()


def test_validation_loss_is_open_clips_loss_per_batch():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(13, 8), dim=-1)
    owner = [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9]  # first captions: rows 0, 2, 3, ..., 10
    first = texts[[0, *range(2, 11)]]
    scale = torch.tensor(2.0)
    expected = [ClipLoss()(images[s], first[s], scale.exp()).item() for s in (slice(0, 4), slice(4, 8), slice(8, 10))]
    got = validation_loss(images, texts, owner, scale, batch=4)
    assert got == pytest.approx((expected[0] * 4 + expected[1] * 4 + expected[2] * 2) / 10, rel=1e-6)


def test_validation_split_keeps_caption_groups_apart(shapes):
    table = read_caption_table(TableSpec(path=str(shapes / "train.csv")))
    train, val = split_validation(table, 0.25, seed=0)
    assert len(train) + len(val) == len(table) and len(val) >= 0.25 * len(table)
    train_captions = {c for caps in train.captions for c in caps}
    assert not train_captions & {c for caps in val.captions for c in caps}
    assert set(map(str, train.images)).isdisjoint(map(str, val.images))
    again, _ = split_validation(table, 0.25, seed=0)
    assert again.images == train.images
