"""A 2-process gloo training run (DDP, gathered losses) trains exactly like one process on the same global batches.

One spawn runs every case on both ranks through `cliptune.finetune` (the process group is set up the way torchrun
sets it: environment variables read by the trainer); the main pytest process runs each case on one process and
compares the logged losses of every step and the final weights. Cases cover the plain CLIP loss, GradCache chunks
under DDP (`no_sync`, one-tower last chunk), SigLIP (its bias lives in the objective, synchronised by DDP), NegCLIP
hard negatives, label-aware targets, FSC-CLIP with its token-level loss, FT-CLIP's cross-entropy with Mixup / CutMix
and RandAugment + random erasing (per-sample seeded), and a run resumed from its checkpoint.
"""

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cliptune
from cliptune.train.logging import step_losses
from tests.helpers import shape_labels, spawn_and_wait, tiny_run

WORLD = 2
LABELS = "ddp_labels.txt"
CASES = {
    "clip": {},
    "clip-chunked": {"train": {"chunk_size": 3}},
    "siglip": {"loss": {"name": "siglip", "siglip_bias_init": -2.0}},
    "negclip": {"loss": {"name": "negclip", "tagger": "rules"}},
    "unicl": {"loss": {"name": "unicl"}},
    "fsc": {"loss": {"name": "fsc", "tagger": "rules", "hard_negatives": 2}},
    "mixup": {
        "loss": {"name": "ce"},
        "data": {
            "train": None,
            "augment": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25},
            "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
        },
    },
    "resumed": {},  # one epoch, then resumed for a second
}


def _config(shapes: Path, out: Path, name: str) -> dict:
    cfg = tiny_run(shapes, out, name, runtime={"log_every": 1}, **CASES[name])
    if cfg.get("loss", {}).get("name") == "ce":
        cfg["data"]["labelled"] = {"path": str(shapes / LABELS), "templates": ["a photo of a {}."]}
    return cfg


def _train(shapes: Path, out: Path, name: str) -> None:
    if name != "resumed":
        cliptune.finetune(_config(shapes, out, name))
        return
    cliptune.finetune(_config(shapes, out, name))
    cliptune.finetune(_config(shapes, out, name), resume=True, train={"epochs": 2})


def _worker(rank: int, port: int, shapes: str, out: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        for name in CASES:
            _train(Path(shapes), Path(out), name)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """(two-process output dir, one-process output dir), every case trained in both."""
    tmp = tmp_path_factory.mktemp("ddp")
    two, one = tmp / "two", tmp / "one"
    shape_labels(shapes, LABELS)
    spawn_and_wait(_worker, (_free_port(), str(shapes), str(two)), WORLD, timeout_s=300)
    for name in CASES:
        _train(shapes, one, name)
    yield two, one
    shutil.rmtree(tmp, ignore_errors=True)  # about 1 GB of checkpoints: free the disk for the rest of the suite


def _losses(run: Path) -> list[float]:
    return step_losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_like_one(runs, name):
    two, one = runs[0] / name, runs[1] / name
    assert len(_losses(two)) == len(_losses(one)) == (12 if name == "resumed" else 6)  # 96 images, batch 16
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-4, atol=1e-5)
    got, expected = load_file(two / "model" / "model.safetensors"), load_file(one / "model" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=2e-5, msg=key)


@pytest.mark.slow
def test_only_the_main_process_writes_the_run(runs):
    results = json.loads((runs[0] / "clip" / "results.json").read_text())
    assert results["run"]["steps"] == 6
    assert (runs[0] / "clip" / "checkpoints").is_dir()


@pytest.mark.slow
def test_torchrun_launches_the_cli(shapes, tmp_path):
    """The real launcher: `torchrun -m cliptune.cli train`, two CPU processes, gloo; rank 0 reports and writes."""
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config(shapes, tmp_path / "runs", "clip")))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "cliptune.cli", "train", str(config), "name=launched"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1
    assert json.loads((tmp_path / "runs" / "launched" / "results.json").read_text())["run"]["steps"] == 6
