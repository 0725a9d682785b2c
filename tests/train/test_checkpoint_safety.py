"""Checkpoints and model folders are read without pickle and without leaving their folder; faults name the file."""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cliptune
from cliptune.config import ModelConfig
from cliptune.models import ModelError, build_model, save_model
from cliptune.models.checkpoints import CheckpointError, latest_checkpoint
from cliptune.train.checkpoint import read_state, write_state
from cliptune.utils.paths import PathEscapeError
from tests.helpers import cli, run_config, write_yaml

SRC = Path(cliptune.__file__).parent


class _Payload:
    """Unpickling this runs `os.system(command)`: what a crafted state.pt or weights file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _malicious(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"epoch": 1, "step": 6, "rng": _Payload(f"touch {marker}")}))
    return path


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    """A run directory with one epoch checkpoint (no eval sets: only the files matter here)."""
    out = tmp_path_factory.mktemp("trained")
    cfg = run_config(shapes, out, epochs=1)
    cfg["eval"] = {}
    cliptune.finetune(cfg)
    return out / "run"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run to damage."""
    copy = tmp_path / "runs" / "run"
    shutil.copytree(trained, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["runtime"]["output_dir"] = str(copy.parent)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    return copy


def _resume(run: Path, shapes: Path, **extra) -> dict:
    cfg = run_config(shapes, run.parent, epochs=2, **extra)
    cfg["eval"] = {}
    return cliptune.finetune(cfg, resume=True)


# ---------------------------------------------------------------------------------------------------------------
# The format


def test_state_round_trips_tuples_int_keys_arrays_and_tensors(tmp_path):
    state = {
        "opt": {
            "state": {0: {"exp_avg": torch.randn(3), "step": torch.tensor(4.0)}},
            "groups": [{"betas": (0.9, 0.98)}],
        },
        "rng": {"python": (3, tuple(range(5)), None), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "none": None,
        "inf": float("inf"),
    }
    write_state(tmp_path, {"epoch": 1, "step": 2, **state})
    back = read_state(tmp_path)
    assert set(back["opt"]["state"]) == {0} and back["opt"]["groups"][0]["betas"] == (0.9, 0.98)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert back["rng"]["python"] == state["rng"]["python"] and back["inf"] == float("inf")
    assert all(np.array_equal(a, b) for a, b in zip(back["rng"]["numpy"], state["rng"]["numpy"]))
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert not (tmp_path / "state.pt").exists()


def test_resumed_optimizer_steps_exactly_like_the_saved_one(tmp_path):
    """AdamW state through safetensors + JSON continues bit for bit (the reference: the optimizer never saved)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()
        opt.step()
    write_state(tmp_path, {"epoch": 0, "step": 3, "rng": {}, "optimizer": opt.state_dict()})
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = torch.optim.AdamW(twins, lr=0.5)
    twin.load_state_dict(read_state(tmp_path)["optimizer"])
    for group, ps in ((opt, params), (twin, twins)):
        group.zero_grad()
        sum((p**2).sum() for p in ps).backward()
        group.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twins))


def test_no_pickle_reader_in_the_package():
    """Nothing cliptune ships unpickles: no pickle module, no torch.load without weights_only=True, no yaml.load."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for pattern in (
            r"pickle\.(Unpickler|loads?)\b|import (dill|cloudpickle)",
            r"weights_only\s*=\s*False",
            r"yaml\.(unsafe_load|load\((?![^)]*Loader=_StrictLoader))",
        ):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text, re.M)]
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.name}: {call.group(0)}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------------
# Resuming from a damaged or hostile run folder


@pytest.mark.slow
def test_pickled_state_is_refused_without_running(run, shapes, tmp_path):
    epoch = run / "checkpoints" / "epoch_1"
    marker = tmp_path / "pwned"
    for name in ("state.json", "state.safetensors"):
        (epoch / name).unlink()
    _malicious(epoch / "state.pt", marker)
    with pytest.raises(CheckpointError, match=r"state\.pt, a pickle"):
        _resume(run, shapes)
    config = write_yaml({**run_config(shapes, run.parent, epochs=2), "eval": {}}, tmp_path / "c.yaml")
    proc = cli("train", str(config), "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "state.pt" in proc.stderr
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/tmp", "epoch_1/../../..", "epoch_x"])
def test_latest_pointer_must_name_an_epoch_folder_inside(run, pointer):
    (run / "checkpoints" / "latest").write_text(pointer)
    with pytest.raises(CheckpointError, match="latest"):
        latest_checkpoint(run / "checkpoints")


def test_checkpoint_symlinked_outside_the_run_is_refused(run, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(run / "checkpoints" / "epoch_1", outside)
    (run / "checkpoints" / "epoch_1").symlink_to(outside)
    with pytest.raises(PathEscapeError, match="outside"):
        latest_checkpoint(run / "checkpoints")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda e: (e / "state.json").write_text("{ truncated"), "not valid JSON"),
        (lambda e: (e / "state.json").write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
        (lambda e: (e / "state.json").write_text('{"format": 1}'), "checkpoint format 1"),
        (lambda e: (e / "state.json").write_text('{"format": 2}'), "missing epoch, step, rng"),
        (lambda e: (e / "state.safetensors").write_bytes(b"\x00" * 5), "not a readable safetensors"),
        (lambda e: (e / "state.safetensors").unlink(), "state.safetensors is missing"),
        (lambda e: (e / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda e: _truncate(e / "model.safetensors"), "not a readable safetensors"),
    ],
)
def test_damaged_checkpoint_files_name_the_file(run, shapes, damage, message):
    damage(run / "checkpoints" / "epoch_1")
    with pytest.raises(CheckpointError, match=message) as err:
        _resume(run, shapes)
    assert "epoch_1" in str(err.value)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_foreign_weights_say_they_do_not_fit_the_run(run, shapes):
    other = build_model(ModelConfig(arch="cliptune-tiny-rn"))
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()}, str(run / "checkpoints/epoch_1/model.safetensors")
    )
    with pytest.raises(CheckpointError, match=r"does not fit the model .*start a new `name`"):
        _resume(run, shapes)
    shutil.rmtree(run / "model")  # an interrupted run: inference falls back to the newest checkpoint
    with pytest.raises(CheckpointError, match="does not fit"):
        cliptune.load(run)


# ---------------------------------------------------------------------------------------------------------------
# model.json


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_model(build_model(ModelConfig()), tmp_path_factory.mktemp("saved") / "model")


def _edit_spec(saved: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    spec = json.loads((folder / "model.json").read_text())
    edit(spec)
    (folder / "model.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda s: s.update(backend="tensorflow"), "backend"),
        (lambda s: s.pop("backend"), "backend"),
        (lambda s: s.pop("arch"), "arch"),
        (lambda s: s.update(arch=7), "arch"),
        (lambda s: s.update(quick_gelu="yes"), "quick_gelu"),
        (lambda s: s.update(preprocess=[1, 2]), "preprocess"),
        (lambda s: s["preprocess"].update(mean=[0.5, 0.5]), "preprocess.mean"),
        (lambda s: s["preprocess"].update(std=[0.5, 0.0, 0.5]), "preprocess.std"),
        (lambda s: s["preprocess"].update(std="0.5"), "preprocess.std"),
        (lambda s: s["preprocess"].update(interpolation="lanczos9"), "preprocess.interpolation"),
        (lambda s: s["preprocess"].update(resize_mode="stretch"), "preprocess.resize_mode"),
        (lambda s: s.update(backend="heads", heads="linear", base=[]), "base"),
        (lambda s: s.update(backend="heads", heads="linear", base={"backend": "nope"}), "base.backend"),
    ],
)
def test_invalid_model_json_names_the_file_and_field(saved, tmp_path, edit, field):
    folder = _edit_spec(saved, tmp_path, edit)
    with pytest.raises(ModelError, match=re.escape(str(folder / "model.json"))) as err:
        cliptune.load(folder)
    assert field in str(err.value)


@pytest.mark.parametrize("text", ["{", "[]", "null", "\xff"])
def test_unparseable_model_json_is_a_model_error(saved, tmp_path, text):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    (folder / "model.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelError, match=r"model\.json"):
        cliptune.load(folder)


def test_model_files_linked_outside_the_folder_are_refused(saved, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(saved / "model.safetensors")
    with pytest.raises(PathEscapeError, match="outside"):
        cliptune.load(folder)


def test_openclip_pickled_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    weights = _malicious(tmp_path / "weights.pt", marker)
    with pytest.raises(ModelError, match="refused"):
        build_model(ModelConfig(arch="cliptune-tiny-vit", pretrained=str(weights)))
    assert not marker.exists(), "the pickle payload ran"
