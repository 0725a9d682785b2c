"""Failures a user causes at run time end in one message naming the setting, file or run, never a traceback."""

import logging

import pytest
import torch

import cliptune
from cliptune.config import ConfigError
from cliptune.data.errors import DataError
from cliptune.models.checkpoints import latest_checkpoint, load_weights
from cliptune.train.loop import TrainingDiverged
from tests.helpers import cli, run_config


def _diverge_after_first_epoch(trainer):
    """From epoch 2 on, a learning rate no run survives (the scheduler scales its base rates)."""
    trainer.scheduler.base_lrs = [1e30 for _ in trainer.scheduler.base_lrs]
    trainer.cfg.optim.grad_clip = None


@pytest.mark.slow
def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(shapes, tmp_path):
    cfg = run_config(shapes, tmp_path, epochs=3, optim__grad_clip=None)
    cfg["eval"] = {}
    with pytest.raises(TrainingDiverged, match=r"(?s)epoch 2\).*epoch_1.*optim\.lr.*optim\.grad_clip") as err:
        cliptune.finetune(cfg, callbacks=(_diverge_after_first_epoch,))
    assert isinstance(err.value, ValueError)  # the CLI prints it without a traceback, exit code 2
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "epoch_1"
    model = cliptune.load(tmp_path / "run").model  # the interrupted run loads from its last good checkpoint
    load_weights(checkpoints / "epoch_1", model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_output_dir_that_is_a_file_is_named(shapes, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"runtime.output_dir.*a file is in the way"):
        cliptune.finetune(run_config(shapes, blocker))


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps", "cuda:0" if not torch.cuda.is_available() else "cuda:99"])
def test_unusable_devices_are_config_errors(device):
    with pytest.raises(ConfigError, match="device"):
        cliptune.load("cliptune-tiny-vit", device=device)


@pytest.mark.slow
def test_cli_out_collisions_and_bad_devices_exit_2_without_traceback(shapes, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a red square\n")
    for args in (  # more cases (an --out that is an input, in a missing folder) are in benchmarks/probe.py --slow
        ["encode", "--model", "cliptune-tiny-vit", "--texts", str(texts), "--out", str(tmp_path)],
        ["eval", "--model", "cliptune-tiny-vit", "--data", str(shapes / "val.csv"), "--device", "cuda:x"],
    ):
        proc = cli(*args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "--out" in proc.stderr or "device" in proc.stderr


def test_eval_sets_whose_scores_mean_nothing_are_named(caplog):
    from pathlib import Path

    from cliptune.data import CaptionTable, LabelledImages
    from cliptune.eval import EvalSuite

    one_image = CaptionTable([Path("a.png")], [["a cat"]], name="tiny")
    one_class = LabelledImages([Path("a.png"), Path("b.png")], [0, 0], ["cat", "dog"], name="cats")
    two = CaptionTable([Path("a.png"), Path("b.png")], [["a cat"], ["a dog"]], name="fine")
    EvalSuite(retrieval=[one_image, two], zeroshot=[(one_class, ["a {}"])]).warn_degenerate()
    assert "eval.retrieval tiny: 1 usable image" in caplog.text
    assert "eval.zeroshot cats: images of 1 class" in caplog.text
    assert "fine" not in caplog.text


def _table_with_missing(shapes, tmp_path, present: int, missing: int):
    rows = (shapes / "train.csv").read_text().splitlines()
    header, good = rows[0], rows[1 : 1 + present]
    images = str(shapes)  # the shapes rows' image paths are relative to its folder
    absent = [f"images/gone_{i}.png,a shape that is gone" for i in range(missing)]
    table = tmp_path / "short.csv"
    table.write_text("\n".join([header, *good, *absent]) + "\n")
    return {"path": str(table), "images_root": images}


def test_skips_that_leave_less_than_a_batch_are_refused_naming_table_count_and_fix(shapes, tmp_path):
    cfg = run_config(shapes, tmp_path, epochs=1)
    cfg["data"]["train"] = _table_with_missing(shapes, tmp_path, present=5, missing=12)
    with pytest.raises(DataError) as err:
        cliptune.finetune(cfg)
    message = str(err.value)
    assert "'short'" in message and "5 usable images" in message and "train.batch_size 16" in message
    assert "12 missing images (first: " in message and "gone_0.png" in message
    assert "lower train.batch_size to at most 5" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_one_usable_image_with_a_contrastive_loss_is_refused(shapes, tmp_path):
    cfg = run_config(shapes, tmp_path, epochs=1)
    cfg["data"]["train"] = _table_with_missing(shapes, tmp_path, present=1, missing=0)
    with pytest.raises(DataError, match=r"'short': 1 usable image; loss.name clip .* at least 2"):
        cliptune.finetune(cfg)


def test_evaluating_one_set_names_a_score_that_means_nothing(shapes, tmp_path, caplog):
    rows = (shapes / "val.csv").read_text().splitlines()
    table = tmp_path / "one.csv"
    table.write_text(f"{rows[0]}\n{rows[1]}\n")
    with caplog.at_level(logging.WARNING, logger="cliptune"):
        scores = cliptune.evaluate("cliptune-tiny-vit", {"path": str(table), "images_root": str(shapes)})
    assert scores["mean_recall"] == 100.0 and "eval.retrieval one: 1 usable image" in caplog.text
