"""ONNX export of every backend and wrapper, checked in onnxruntime against torch (batch 1 and 7), int8, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoTokenizer

import cliptune
from cliptune.cli import main
from cliptune.config import LoraConfig, ModelConfig, TowerConfig
from cliptune.models import ClipModel, build_model
from cliptune.models.classifier import ClassifierModel
from cliptune.models.heads import add_heads
from cliptune.models.prompted import add_prompts
from cliptune.tuning.lora import apply_lora
from tests.helpers import CAPTIONS, tiny_config

TEXTS = [*CAPTIONS, "", "A Photo, of: THE dog!", "blue " * 40]  # 7: empty, punctuation, longer than any context


def tuned(model: ClipModel, seed: int = 0) -> ClipModel:
    """Every weight moved a little, so identity-initialised heads and zero prompts are not what gets checked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _lite_minilm(backends: dict[str, ModelConfig]) -> ModelConfig:
    """lite0-minilm's shape: an efficientnet-lite0 image tower (random) and the tiny BERT text tower."""
    bert = backends["composed"].text_tower.name
    return tiny_config(
        Path(bert), image=TowerConfig(source="efficientnet-lite", name="efficientnet-lite0", pretrained=False)
    )


CASES = {
    "openclip-vit": lambda b: build_model(b["openclip-vit"]),
    "openclip-rn": lambda b: build_model(b["openclip-rn"]),
    "hf-clip": lambda b: build_model(b["hf-clip"]),
    "hf-siglip": lambda b: build_model(b["hf-siglip"]),
    "composed": lambda b: build_model(b["composed"]),
    "lite0-minilm-like": lambda b: build_model(_lite_minilm(b)),
    "prompted-openclip": lambda b: add_prompts(build_model(b["openclip-vit"]), 3),
    "prompted-composed-mlp-heads": lambda b: add_heads(add_prompts(build_model(b["composed"]), 2), "mlp"),
    "heads-hf-clip": lambda b: add_heads(build_model(b["hf-clip"]), "linear"),
    "classifier-openclip-rn": lambda b: ClassifierModel(
        build_model(b["openclip-rn"]), ["a", "b", "c"], torch.randn(3, 64)
    ),
}


def _images(model: ClipModel, count: int) -> np.ndarray:
    from PIL import Image

    gen = np.random.default_rng(5)
    pictures = [Image.fromarray(gen.integers(0, 255, (40 + 7 * i, 56, 3), dtype=np.uint8)) for i in range(count)]
    return np.stack([model.eval_transform(p).numpy() for p in pictures])


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", CASES)
def test_onnx_matches_torch(backends, case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tuned(CASES[case](backends))
    cliptune.export(model, "onnx", tmp_path / "onnx")
    folder = tmp_path / "onnx"
    settings = json.loads((folder / "preprocess.json").read_text())
    images, text = _session(folder / "image_encoder.onnx"), _session(folder / "text_encoder.onnx")
    assert [i.name for i in images.get_inputs()] == ["pixel_values"]
    expected_inputs = ["input_ids", "attention_mask"] if model.text_attention_mask else ["input_ids"]
    assert [i.name for i in text.get_inputs()] == expected_inputs == settings["text"]["inputs"]
    # The tokenizer written beside gives cliptune's ids up to each caption's end; after it, padding (open_clip
    # pads with 0, transformers' CLIP tokenizer with <|endoftext|>; no tower reads it).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(TEXTS, padding="max_length", truncation=True, return_tensors="np")
    ours = model.tokenize(TEXTS).numpy()
    assert batch["input_ids"].shape == ours.shape
    content = batch["attention_mask"] == 1
    np.testing.assert_array_equal(batch["input_ids"][content], ours[content])
    pixels = _images(model, 7)
    with torch.no_grad():
        want_images = model.encode_image(torch.from_numpy(pixels)).numpy()
        want_texts = model.encode_text(model.tokenize(TEXTS)).numpy()
    for n in (1, 7):
        got = images.run(None, {"pixel_values": pixels[:n]})
        assert np.abs(got[0] - want_images[:n]).max() <= 1e-4
        np.testing.assert_allclose(np.linalg.norm(got[0], axis=1), 1.0, atol=1e-5)
        if case.startswith("classifier"):
            np.testing.assert_allclose(got[1], model.classify(torch.from_numpy(pixels[:n])).detach().numpy(), atol=1e-3)
        feed = {name: batch[name][:n].astype(np.int64) for name in expected_inputs}
        assert np.abs(text.run(["embeddings"], feed)[0] - want_texts[:n]).max() <= 1e-4
    if settings["text"]["dynamic_length"]:  # the same captions padded to a shorter length embed the same
        short = tokenizer(TEXTS[:4], padding="longest", truncation=True, return_tensors="np")
        feed = {name: short[name].astype(np.int64) for name in expected_inputs}
        assert feed["input_ids"].shape[1] < batch["input_ids"].shape[1]
        assert np.abs(text.run(["embeddings"], feed)[0] - want_texts[:4]).max() <= 1e-4


def test_onnx_exports_merged_lora_weights(backends, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(backends["openclip-vit"])
    apply_lora(model, LoraConfig(rank=2))
    tuned(model)  # moves lora_B off zero: the adapters change the embeddings
    report = cliptune.export(model, "onnx", tmp_path / "onnx")
    pixels = _images(model, 2)
    got = _session(tmp_path / "onnx" / "image_encoder.onnx").run(None, {"pixel_values": pixels})[0]
    with torch.no_grad():
        want = model.eval().encode_image(torch.from_numpy(pixels)).numpy()  # the live model, adapters unmerged
    assert np.abs(got - want).max() <= 1e-4 and report["max_abs_diff"] <= 1e-4
    assert any("lora" in n for n, _ in model.named_parameters()), "the caller's model keeps its adapters"


def test_quantize_int8_prints_the_retrieval_change(backends, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    cliptune.export(tuned(build_model(backends["openclip-vit"])), "cliptune", tmp_path / "saved")
    args = ["export", "--model", str(tmp_path / "saved"), "--format", "onnx", "--out", str(tmp_path / "q")]
    assert main([*args, "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "int8 vs fp32" in out and "mean_recall" in out and "change" in out
    for name in ("image_encoder.int8.onnx", "text_encoder.int8.onnx"):
        assert (tmp_path / "q" / name).stat().st_size < (tmp_path / "q" / name.replace(".int8", "")).stat().st_size
    settings = json.loads((tmp_path / "q" / "preprocess.json").read_text())
    assert settings["quantized"]["files"] == ["image_encoder.int8.onnx", "text_encoder.int8.onnx"]


def test_bad_requests_fail_clearly_and_write_nothing(backends, tmp_path: Path, capsys) -> None:
    saved = tmp_path / "saved"
    cliptune.export(build_model(backends["composed"]), "cliptune", saved)
    for extra, message in (
        (["--format", "hf"], "VisionTextDualEncoderModel pools the text tower"),
        (["--format", "open_clip"], "It can be exported as: cliptune, onnx"),
        (["--format", "hf", "--quantize", "int8"], "onnx format only"),
        (["--format", "onnx", "--alpha", "0.5"], "has no initial.safetensors"),
    ):
        assert main(["export", "--model", str(saved), "--out", str(tmp_path / "out"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", "--model", str(saved), "--out", str(tmp_path / "mine"), "--format", "onnx"]) == 2
    assert "holds no earlier export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
