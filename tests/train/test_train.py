"""End-to-end fine-tuning: the run directory, learning, checkpoints, and kill-and-resume equivalence."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import cliptune
from cliptune.config import ConfigError
from cliptune.models.checkpoints import latest_checkpoint
from tests.helpers import cli, load_benchmark, run_config, write_yaml


def _kill_resume():
    """benchmarks/kill_resume.py: its `paused` runner lets a test kill a run inside a checkpoint write."""
    return load_benchmark("kill_resume")


RETRIEVAL = {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cliptune-tiny-vit", "cliptune-tiny-rn"])
def test_cli_run_learns_and_writes_the_run_directory(shapes, tmp_path, arch):
    config = write_yaml(run_config(shapes, tmp_path / "runs", arch=arch, epochs=4), tmp_path / "c.yaml")
    proc = cli("train", str(config), "name=try2", "optim.lr=2e-3")
    run = tmp_path / "runs" / "try2"
    assert "mean_recall" in proc.stdout and str(run) in proc.stdout
    for item in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "summary.md",
        "curves.png",
        "train.jsonl",
        "checkpoints",
        "tensorboard",
        "model/model.json",
        "model/model.safetensors",
    ):
        assert (run / item).exists(), item
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    results = json.loads((run / "results.json").read_text())
    base, final = results["baseline"]["val"], results["final"]["val"]
    assert set(final) == RETRIEVAL
    assert final["mean_recall"] > base["mean_recall"] + 10, (base, final)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["eval"]) for r in records] == [(e, "val") for e in range(5)]
    assert all({"epoch", "step", "eval"} | RETRIEVAL == set(r) for r in records)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 2e-3
    assert "| mean_recall |" in (run / "summary.md").read_text()
    # the CLIP loss's two directions are logged apart (objective.record_terms); the loss is their mean
    steps = [r for r in map(json.loads, (run / "train.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps and all(r["loss/image_to_text"] != r["loss/text_to_image"] for r in steps)
    for r in steps:
        assert (r["loss/image_to_text"] + r["loss/text_to_image"]) / 2 == pytest.approx(r["loss"], rel=1e-6)
    # the held-out set's loss at every evaluation goes to the training log (its results keep to recalls, above)
    val_losses = [
        (r["step"], r["val_loss/val"])
        for r in map(json.loads, (run / "train.jsonl").read_text().splitlines())
        if "val_loss/val" in r
    ]
    assert [step for step, _ in val_losses] == [r["step"] for r in records]
    assert all(0 < loss < 10 for _, loss in val_losses)


@pytest.mark.slow
def test_saved_config_reproduces_the_run(shapes, tmp_path):
    first = cliptune.finetune(run_config(shapes, tmp_path / "a", epochs=2))
    saved = Path(first["run_dir"]) / "config.yaml"
    second = cliptune.finetune(saved, overrides=[f"runtime.output_dir={tmp_path / 'b'}"])
    assert first["final"] == second["final"] and first["baseline"] == second["baseline"]


def _stop_after_first_epoch(trainer):
    if trainer.state.epoch == 1:
        raise KeyboardInterrupt


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(shapes, tmp_path):
    whole = cliptune.finetune(run_config(shapes, tmp_path / "whole"))
    cfg = run_config(shapes, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        cliptune.finetune(cfg, callbacks=(_stop_after_first_epoch,))
    run_dir = tmp_path / "cut" / "run"
    assert latest_checkpoint(run_dir / "checkpoints").name == "epoch_1"
    with pytest.raises(ConfigError, match="pass --resume"):
        cliptune.finetune(cfg)
    with pytest.raises(ConfigError, match=r"--resume: optim.lr is 0.5"):
        cliptune.finetune(cfg, resume=True, overrides=["optim.lr=0.5"])
    resumed = cliptune.finetune(cfg, resume=True)
    assert resumed["final"] == whole["final"] and resumed["baseline"] == whole["baseline"]
    a, b = _weights(whole["run_dir"]), _weights(resumed["run_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["run"]["steps"] == whole["run"]["steps"]
    records = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), "replayed steps were logged twice"
    assert [r["epoch"] for r in records if "epoch_mean_loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_result(shapes, tmp_path, monkeypatch):
    """SIGKILL inside a checkpoint write: atomic checkpoints make --resume exact, and the leftover is removed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one torch thread, as in this process: bitwise comparable weights
    whole = cliptune.finetune(run_config(shapes, tmp_path / "whole", epochs=5))
    config = write_yaml(run_config(shapes, tmp_path / "cut", epochs=5), tmp_path / "c.yaml")
    # kill_resume's `paused` lets safetensors write the first file of checkpoint epoch_2, then waits to be killed
    bench = _kill_resume()
    proc = bench.start(["train", str(config)], pause_in="/.epoch_2.")
    assert bench.kill_when_paused(proc), "the run ended before its second checkpoint"
    run_dir = tmp_path / "cut" / "run"
    assert latest_checkpoint(run_dir / "checkpoints").name == "epoch_1"
    assert [p.name.split(".")[1] for p in (run_dir / "checkpoints").glob(".epoch_2.*.tmp")] == ["epoch_2"]
    assert not (run_dir / "model").exists()
    resume = cli("train", str(config), "--resume")
    assert "resumed from" in resume.stderr and "removed 1 temporaries left by killed runs" in resume.stderr
    assert "taking over the lock of process" in resume.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final"] == whole["final"]
    a, b = _weights(whole["run_dir"]), _weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run_dir.rglob(".*.tmp")) and not (run_dir / "run.lock").exists()


@pytest.mark.slow
def test_eval_and_encode_commands_agree_with_the_run(shapes, tmp_path):
    out = cliptune.finetune(run_config(shapes, tmp_path, epochs=1))
    run = out["run_dir"]
    metrics = json.loads(cli("eval", "--model", run, "--data", str(shapes / "val.csv")).stdout)
    assert metrics == pytest.approx(out["final"]["val"])
    assert cliptune.evaluate(cliptune.load(run), str(shapes / "val.csv")) == pytest.approx(metrics)
    cli("encode", "--model", run, "--images", str(shapes / "val.csv"), "--out", str(tmp_path / "img.npy"))
    (tmp_path / "texts.txt").write_text("a red circle\na blue square\n")
    cli("encode", "--model", run, "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "txt.npy"))
    img, txt = np.load(tmp_path / "img.npy"), np.load(tmp_path / "txt.npy")
    assert img.shape == (32, 64) and txt.shape == (2, 64) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    encoder = cliptune.load(run)
    np.testing.assert_allclose(encoder.encode_texts(["a red circle", "a blue square"]), txt, atol=1e-6)


def test_corrupt_and_missing_training_images_are_skipped_and_counted(shapes, tmp_path):
    rows = (shapes / "train.csv").read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows += [f"{tmp_path / 'broken.png'},a broken image", f"{tmp_path / 'gone.png'},a missing image"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = run_config(shapes, tmp_path / "runs", epochs=1)
    cfg["data"]["train"] = {"path": str(tmp_path / "train.csv"), "images_root": str(shapes)}
    cfg["eval"]["retrieval"] = []
    out = cliptune.finetune(cfg)
    assert out["run"]["skipped_images"] == 2 and out["run"]["train_images"] == 96
    named = [f"{tmp_path / 'broken.png'} (unreadable or not an image)", f"{tmp_path / 'gone.png'} (does not exist)"]
    assert out["run"]["skipped_first"] == named
    summary = (Path(out["run_dir"]) / "summary.md").read_text()
    assert "Training data: 2 images skipped when the table was read; first: " + "; ".join(named) in summary


def test_bad_training_table_fails_before_any_work(shapes, tmp_path):
    cfg = run_config(shapes, tmp_path / "runs", data__train={"path": str(shapes / "train.csv"), "caption_key": "text"})
    with pytest.raises(ValueError, match=r"caption_key.*caption"):
        cliptune.finetune(cfg)
    assert not (tmp_path / "runs").exists()
    proc = cli("train", str(write_yaml({"optim": {"lr": "fast"}}, tmp_path / "bad.yaml")), check=False)
    assert proc.returncode == 2 and "optim.lr: expected a number, got 'fast'" in proc.stderr


def test_bf16_autocast_runs_on_cpu(shapes, tmp_path):
    out = cliptune.finetune(run_config(shapes, tmp_path, epochs=1), overrides=["runtime.precision=bf16"])
    assert out["run"]["precision"] == "bf16" and np.isfinite(out["final"]["val"]["mean_recall"])
