"""Every strategy through the whole trainer: what trains, what is saved, and that the saved model loads back."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cliptune
from cliptune.config import ConfigError
from cliptune.models import load_model
from tests.helpers import run_config


def _run(shapes: Path, out: Path, epochs: int = 2, **sections) -> dict:
    cfg = run_config(shapes, out, epochs=epochs)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cliptune.finetune(cfg)


def _texts_equal(run_dir: str, captions: list[str]) -> None:
    """The saved model loads as a plain model and encodes like `cliptune.load` of the run."""
    a = cliptune.load(run_dir).encode_texts(captions)
    b = cliptune.load(str(Path(run_dir) / "model")).encode_texts(captions)
    assert (a == b).all()


@pytest.mark.slow
def test_lora_trains_only_adapters_and_saves_a_merged_model(shapes, tmp_path):
    out = _run(shapes, tmp_path, finetune={"lora": {"rank": 4}})
    run = Path(out["run_dir"])
    adapters = load_file(str(run / "model" / "adapter.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)
    merged = load_file(str(run / "model" / "model.safetensors"))
    assert not any("lora_" in k for k in merged)
    initial = load_file(str(run / "initial.safetensors"))
    changed = [k for k in initial if not torch.equal(initial[k], merged[k])]
    assert any("resblocks" in k for k in changed), "adapters were merged into the attention / MLP weights"
    assert not any("conv1" in k or "token_embedding" in k for k in changed), "base weights outside adapters moved"
    adapter_count = sum(v.numel() for v in adapters.values())
    assert out["run"]["trainable_parameters"] == adapter_count + 1  # the adapters and the temperature
    _texts_equal(out["run_dir"], ["a red circle", "a blue square"])


@pytest.mark.slow
def test_heads_and_prompts_on_a_locked_model(shapes, tmp_path):
    out = _run(shapes, tmp_path, finetune={"lock_image": True, "lock_text": True, "heads": "mlp", "prompt_tokens": 4})
    spec = json.loads((Path(out["run_dir"]) / "model" / "model.json").read_text())
    assert spec["backend"] == "heads" and spec["base"]["backend"] == "prompted" and spec["base"]["n"] == 4
    weights = load_file(str(Path(out["run_dir"]) / "model" / "model.safetensors"))
    initial = load_file(str(Path(out["run_dir"]) / "initial.safetensors"))
    changed = {k for k in initial if not torch.equal(initial[k], weights[k])}
    assert any(k.startswith("heads.") for k in changed) and any(k.endswith("prompt") for k in changed)
    assert not any("visual" in k or "resblocks" in k for k in changed)
    _texts_equal(out["run_dir"], ["a red circle"])


@pytest.mark.slow
def test_partial_locking_and_layer_decay(shapes, tmp_path, caplog):
    caplog.set_level("INFO", logger="cliptune")
    out = _run(
        shapes,
        tmp_path,
        finetune={"lock_image": True, "lock_image_patterns": "!transformer.resblocks.1,!ln_post,!proj"},
        optim={"layer_decay_image": 0.5, "layer_decay_text": 0.8},
    )
    assert "parameter groups" in caplog.text and "0.5" in caplog.text
    weights = load_file(str(Path(out["run_dir"]) / "model" / "model.safetensors"))
    initial = load_file(str(Path(out["run_dir"]) / "initial.safetensors"))
    assert "model.visual.conv1.weight" not in initial  # locked: never changes, never stored twice
    assert not torch.equal(
        initial["model.visual.transformer.resblocks.1.attn.in_proj_weight"],
        weights["model.visual.transformer.resblocks.1.attn.in_proj_weight"],
    )


def _stop_after_first_epoch(trainer):
    if trainer.state.epoch == 1:
        raise KeyboardInterrupt


@pytest.mark.slow
def test_ema_evaluates_ema_weights_and_resumes_exactly(shapes, tmp_path):
    extra = {"finetune": {"ema_decay": 0.9}}
    whole = _run(shapes, tmp_path / "whole", epochs=3, **extra)
    cfg = run_config(shapes, tmp_path / "cut", epochs=3)
    cfg["finetune"] = {"ema_decay": 0.9}
    with pytest.raises(KeyboardInterrupt):
        cliptune.finetune(cfg, callbacks=(_stop_after_first_epoch,))
    resumed = cliptune.finetune(cfg, resume=True)
    assert resumed["final"] == whole["final"]
    run = Path(whole["run_dir"])
    ema, raw = (
        load_file(str(run / "model" / "model.safetensors")),
        load_file(str(run / "model_raw" / "model.safetensors")),
    )
    assert not torch.equal(ema["model.logit_scale"], raw["model.logit_scale"])
    metrics = cliptune.evaluate(cliptune.load(str(run)), str(shapes / "val.csv"))
    assert metrics == pytest.approx(whole["final"]["val"]), "the saved model is the evaluated (EMA) one"


@pytest.mark.slow
def test_wise_sweep_and_export(shapes, tmp_path):
    out = _run(shapes, tmp_path, eval={"wise_alphas": [0.0, 0.5, 1.0]})
    run = Path(out["run_dir"])
    assert set(out["wise"]) == {"0.0", "0.5", "1.0"}
    assert out["wise"]["0.0"]["val"] == pytest.approx(out["baseline"]["val"])
    assert out["wise"]["1.0"]["val"] == pytest.approx(out["final"]["val"])
    assert (run / "wise.png").stat().st_size > 0 and "| 0.5" in (run / "wise.md").read_text()
    from cliptune.cli import main

    assert main(["export", "--model", str(run), "--alpha", "0", "--out", str(tmp_path / "zs")]) == 0
    assert cliptune.evaluate(cliptune.load(str(tmp_path / "zs")), str(shapes / "val.csv")) == pytest.approx(
        out["baseline"]["val"]
    )


@pytest.mark.slow
def test_init_from_a_run_continues_from_its_weights(shapes, tmp_path):
    first = _run(shapes, tmp_path / "a")
    second = _run(shapes, tmp_path / "b", model={"init": first["run_dir"]})
    assert second["baseline"]["val"] == pytest.approx(first["final"]["val"])
    assert isinstance(load_model(Path(second["run_dir"]) / "model"), type(load_model(Path(first["run_dir"]) / "model")))


def test_lora_on_a_locked_tower_is_refused(shapes, tmp_path):
    with pytest.raises(ConfigError, match=r"finetune\.lora\.towers"):
        _run(shapes, tmp_path, finetune={"lock_image": True, "lock_text": True, "lora": {"rank": 4}})


@pytest.mark.slow
def test_chunked_batches_train_like_whole_batches(shapes, tmp_path, monkeypatch):
    """GradCache in the trainer: a batch of 16 in chunks of 5 gives the weights of the unchunked run."""
    from cliptune.train import loop

    whole = _run(shapes, tmp_path / "whole", epochs=1)
    calls = []
    original = loop.chunked_backward
    monkeypatch.setattr(loop, "chunked_backward", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
    chunked = _run(shapes, tmp_path / "chunked", epochs=1, train={"batch_size": 16, "chunk_size": 5})
    assert calls and set(calls) == {5}
    a = load_file(str(Path(whole["run_dir"]) / "model" / "model.safetensors"))
    b = load_file(str(Path(chunked["run_dir"]) / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
    assert chunked["final"]["val"] == pytest.approx(whole["final"]["val"], abs=1.0)
