"""Tests of the Hugging Face backend (cliptune.models.hf) on tiny random CLIP and SigLIP models saved locally.

Nothing here touches the network: the models are random `CLIPConfig` / `SiglipConfig` ones written with
`save_pretrained`, the CLIP tokenizer is rebuilt from open_clip's bundled BPE vocabulary (OpenAI's, which pads
with its end-of-text token) and the SigLIP one is a word-level fast tokenizer padding with `</s>` as SigLIP's does.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
)

from cliptune.config import ModelConfig
from cliptune.losses import clip_loss
from cliptune.models import ModelError, build_model, load_model, save_model
from cliptune.models.hf import HFClipModel, rebuild
from tests.helpers import EMBED_DIM, HF_CAPTIONS, IMAGE_SIZE, SIGLIP_CONTEXT, save_tiny_clip, save_tiny_siglip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"clip": save_tiny_clip(root / "clip"), "siglip": save_tiny_siglip(root / "siglip")}


def build(folder: Path) -> HFClipModel:
    model = build_model(ModelConfig(backend="hf", arch=str(folder)))
    assert isinstance(model, HFClipModel)
    return model


@pytest.fixture(scope="module")
def models(folders: dict[str, Path]) -> dict[str, HFClipModel]:
    """Built once for the tests that only read them."""
    return {kind: build(folder).eval() for kind, folder in folders.items()}


def images(n: int = 4) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 50)]
    return [Image.new("RGB", (48 + 8 * i, 40), colours[i % 4]) for i in range(n)]


def pixel_batch(model: HFClipModel, n: int = 4) -> torch.Tensor:
    return torch.stack([model.eval_transform(im) for im in images(n)])


KINDS = pytest.mark.parametrize("kind", ["clip", "siglip"])


@KINDS
def test_build_gives_normalised_embeddings_of_the_right_shape(models: dict[str, HFClipModel], kind: str) -> None:
    model = models[kind]
    assert model.spec() == {"backend": "hf", "arch": model.arch, "model_type": kind}
    with torch.no_grad():
        img = model.encode_image(pixel_batch(model))
        txt = model.encode_text(model.tokenize(HF_CAPTIONS))
        raw = model.encode_text(model.tokenize(HF_CAPTIONS), normalize=False)
    assert img.shape == txt.shape == (4, EMBED_DIM)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4), atol=1e-3)
    assert (model.logit_bias is None) == (kind == "clip")


@KINDS
def test_tokenize_pads_to_a_fixed_length_and_truncates(models: dict[str, HFClipModel], kind: str) -> None:
    model = models[kind]
    length = {"clip": 77, "siglip": SIGLIP_CONTEXT}[kind]
    long_caption = " ".join(["very long caption"] * 40)
    tokens = model.tokenize(["a cat", long_caption])
    assert tokens.dtype == torch.long and tokens.shape == (2, length)
    # One caption at a time, stacked, is what the data pipeline does: it must equal the batch call.
    assert torch.equal(torch.cat([model.tokenize(["a cat"]), model.tokenize([long_caption])]), tokens)
    eos = model.tokenizer.eos_token_id
    assert tokens[1, -1] == eos  # truncation keeps the end-of-text token
    assert tokens[0, -1] == model.tokenizer.pad_token_id


@KINDS
def test_every_parameter_has_the_expected_tower(models: dict[str, HFClipModel], kind: str) -> None:
    model = models[kind]
    towers = {name: model.tower_of(name) for name, _ in model.named_parameters()}
    shared = {n for n, t in towers.items() if t == "shared"}
    assert shared == ({"model.logit_scale"} if kind == "clip" else {"model.logit_scale", "model.logit_bias"})
    for name, tower in towers.items():
        inner = name.removeprefix("model.")
        expected = "image" if inner.startswith(("vision_model.", "visual_projection.")) else tower
        expected = "text" if inner.startswith(("text_model.", "text_projection.")) else expected
        assert tower == expected, name
    if kind == "clip":
        assert towers["model.visual_projection.weight"] == "image"
        assert towers["model.text_projection.weight"] == "text"
    else:  # SigLIP's projections are the heads inside each tower
        assert towers["model.text_model.head.weight"] == "text"
        assert any(n.startswith("model.vision_model.head.") and t == "image" for n, t in towers.items())
    for tower in ("image", "text"):
        in_modules = {id(p) for m in model.tower_modules(tower) for p in m.parameters()}
        assert in_modules == {id(p) for p in model.tower_parameters(tower).values()}
    assert model.tower_modules("shared") == []


@KINDS
def test_save_and_load_give_identical_embeddings(models: dict[str, HFClipModel], kind: str, tmp_path: Path) -> None:
    model = models[kind]
    save_model(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "hf" / "config.json").is_file()
    assert json.loads((tmp_path / "saved" / "model.json").read_text())["model_type"] == kind
    loaded = load_model(tmp_path / "saved")
    assert isinstance(loaded, HFClipModel) and loaded.arch == model.arch
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    tokens = model.tokenize(HF_CAPTIONS)
    assert torch.equal(loaded.tokenize(HF_CAPTIONS), tokens)
    pixels = pixel_batch(model)
    assert torch.equal(pixel_batch(loaded), pixels)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(pixels), model.encode_image(pixels), atol=1e-6)
        assert torch.allclose(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-6)
    assert torch.equal(loaded.logit_scale, model.logit_scale)
    if kind == "siglip":
        assert torch.equal(loaded.logit_bias, model.logit_bias)


@KINDS
def test_training_with_the_text_tower_locked_moves_only_trainable_parameters(
    folders: dict[str, Path], kind: str
) -> None:
    torch.manual_seed(0)
    model = build(folders[kind]).train()
    for name, p in model.named_parameters():
        p.requires_grad_(model.tower_of(name) != "text")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    pixels, tokens = pixel_batch(model), model.tokenize(HF_CAPTIONS)
    for _ in range(3):
        loss = clip_loss(*model(pixels, tokens), model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # SigLIP's logit_bias is trainable but unused by the softmax CLIP loss: it gets no gradient.
    expected = {n for n, p in model.named_parameters() if p.requires_grad and n != "model.logit_bias"}
    assert changed == expected
    assert all(model.tower_of(n) == "text" for n, p in model.named_parameters() if not p.requires_grad)


def test_clip_pools_at_the_first_end_of_text_token_despite_padding(models: dict[str, HFClipModel]) -> None:
    model = models["clip"]
    tokenizer = model.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # OpenAI's tokenizer pads with <|endoftext|>
    short, longer = "a cat", "a small red cat sitting on the green grass in the sun"
    tokens = model.tokenize([short, longer])
    eos = model.eos_positions(tokens)
    assert eos.tolist() == [len(tokenizer(short)["input_ids"]) - 1, len(tokenizer(longer)["input_ids"]) - 1]
    with torch.no_grad():
        alone = model.encode_text(model.tokenize([short]))
        batch = model.encode_text(tokens)
        raw = model.encode_text(tokens, normalize=False)
        # Reference: transformers' own text path, with the mask the tokenizer makes (1 up to and including EOS).
        reference = tokenizer([short, longer], padding="max_length", max_length=77, return_tensors="pt")
        hf = model.model.get_text_features(**reference).pooler_output
        # And by hand: the full, unmasked sequence's state at the first EOS.
        hidden = model.model.text_model(input_ids=tokens).last_hidden_state
        by_hand = model.model.text_projection(hidden[torch.arange(2), eos])
    assert torch.allclose(alone[0], batch[0], atol=1e-6)
    assert torch.allclose(raw, hf, atol=1e-5)
    assert torch.allclose(raw, by_hand, atol=1e-5)


def test_siglip_text_embedding_does_not_depend_on_the_batch(models: dict[str, HFClipModel]) -> None:
    model = models["siglip"]
    with torch.no_grad():
        alone = model.encode_text(model.tokenize(["a cat"]))
        batch = model.encode_text(model.tokenize(["a cat", "a very long caption of a dog on the grass"]))
        # SigLIP's processor passes no attention mask: the same call without one.
        hf = model.model.get_text_features(input_ids=model.tokenize(["a cat"])).pooler_output
    assert torch.allclose(alone[0], batch[0], atol=1e-6)
    assert torch.allclose(alone, torch.nn.functional.normalize(hf, dim=-1), atol=1e-6)


def test_transforms_follow_the_image_processor(models: dict[str, HFClipModel]) -> None:
    # A wide image: red left third, green middle, blue right third.
    wide = Image.new("RGB", (96, 32), (0, 255, 0))
    wide.paste((255, 0, 0), (0, 0, 32, 32))
    wide.paste((0, 0, 255), (64, 0, 96, 32))
    clip, siglip = models["clip"], models["siglip"]
    for model in (clip, siglip):
        assert model.eval_transform(wide).shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert model.train_transform(wide).shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    # CLIP: shortest side to 32 then a centre crop: only the green middle is left.
    clip_px = clip.eval_transform(wide)
    mean, std = torch.tensor(clip.image_processor.image_mean), torch.tensor(clip.image_processor.image_std)
    green = (torch.tensor([0.0, 1.0, 0.0]) - mean) / std
    assert torch.allclose(clip_px[:, 16, 16], green, atol=1e-4)
    assert torch.allclose(clip_px[:, 16, 1], green, atol=1e-4)
    # SigLIP: squashed to 32x32 without a crop, mean and std 0.5: the red third stays, at -1..1.
    siglip_px = siglip.eval_transform(wide)
    assert torch.allclose(siglip_px[:, 16, 1], torch.tensor([1.0, -1.0, -1.0]), atol=1e-4)
    assert torch.allclose(siglip_px[:, 16, 30], torch.tensor([-1.0, -1.0, 1.0]), atol=1e-4)


def test_a_folder_without_preprocessor_config_uses_the_model_image_size(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    folder = shutil.copytree(folders["siglip"], tmp_path / "siglip")
    (folder / "preprocessor_config.json").unlink()
    model = build(folder)
    assert model.eval_transform(images(1)[0]).shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert list(model.image_processor.image_mean) == [0.5, 0.5, 0.5]


def test_rebuild_without_a_folder_builds_from_the_arch(folders: dict[str, Path]) -> None:
    model = rebuild({"backend": "hf", "arch": str(folders["clip"]), "model_type": "clip"}, None)
    assert model.model_type == "clip" and model.context_length == 77


def test_missing_folder_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=re.escape(f"folder '{tmp_path / 'nowhere'}' does not exist")):
        build(tmp_path / "nowhere")


def test_folder_without_config_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=re.escape(f"folder {tmp_path} holds no config.json")):
        build(tmp_path)


def test_folder_without_tokenizer_files_is_a_model_error(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(folders["clip"], tmp_path / "clip")
    for path in folder.glob("tokenizer*"):
        path.unlink()
    with pytest.raises(ModelError, match=re.escape(f"{folder} holds no tokenizer files")):
        build(folder)


def test_unsupported_model_type_is_a_model_error(tmp_path: Path) -> None:
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"'bert' model.*clip and siglip"):
        build(tmp_path)


def test_unreachable_hub_fails_fast_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    # A hub id that no cache holds, so nothing can be found offline.
    with pytest.raises(ModelError, match=r"(?s)hub is unreachable.*local folder"):
        build_model(ModelConfig(backend="hf", arch="cliptune-tests/no-such-model"))
    assert time.monotonic() - start < 5
