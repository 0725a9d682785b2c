"""open_clip and Hugging Face exports: loaded by the libraries themselves, embeddings equal to cliptune's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, AutoTokenizer, CLIPModel

import cliptune
from cliptune.cli import main
from cliptune.models import build_model
from cliptune.models.heads import add_heads
from cliptune.models.openclip import create
from cliptune.models.prompted import add_prompts
from cliptune.tuning.wise import interpolated_model
from tests.export.test_export_onnx import tuned
from tests.helpers import run_config
from tests.tuning.test_wise import fake_run

CAPTIONS = ["a photo of a cat", "A big, RED square!", "", "café au lait — naïve “quotes” ﬁsh", "dog " * 90]

# open_clip in a process that never imports cliptune: what a deployment that only has open_clip does.
OPEN_CLIP_SCRIPT = """
import json, sys
import numpy as np, open_clip, torch
from PIL import Image
folders, images, captions = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
for folder in folders:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in images])
        np.save(folder + "_images.npy", model.encode_image(pixels, normalize=True).numpy())
        np.save(folder + "_texts.npy", model.encode_text(tokenizer(captions), normalize=True).numpy())
assert not any(name.startswith("cliptune") for name in sys.modules), "cliptune was imported"
"""


def _image_files(
    folder: Path, sizes: tuple[tuple[int, int], ...] = ((64, 64), (48, 80), (90, 45), (40, 56))
) -> list[str]:
    """Images of several sizes and shapes, so resizing and centre cropping are part of what is compared.

    The default sizes leave crop margins that transformers' CLIPImageProcessor and torchvision split alike: for a
    margin of 4k + 3 pixels transformers floors the half, torchvision rounds it to even, one pixel apart.
    """
    gen = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{i}.png"
        Image.fromarray(gen.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def vit_run(backends, tmp_path_factory) -> Path:
    """A run directory (initial weights + final model) of the tiny open_clip ViT."""
    run = tmp_path_factory.mktemp("vit-run")
    torch.manual_seed(0)
    fake_run(build_model(backends["openclip-vit"]).eval(), run)
    return run


def test_open_clip_folders_load_in_open_clip_alone(backends, tmp_path: Path) -> None:
    runs, folders = {}, []
    for name in ("openclip-vit", "openclip-rn"):
        runs[name] = tmp_path / name
        torch.manual_seed(0)
        fake_run(build_model(backends[name]).eval(), runs[name])
        out = tmp_path / f"{name}-oc"
        assert main(["export", "--model", str(runs[name]), "--format", "open_clip", "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
        config = json.loads((out / "open_clip_config.json").read_text())
        assert set(config) == {"model_cfg", "preprocess_cfg"} and "vision_cfg" in config["model_cfg"]
        folders.append(str(out))
    images = _image_files(tmp_path / "images", ((64, 64), (50, 80), (90, 45), (33, 41)))  # any crop margin
    script = [sys.executable, "-c", OPEN_CLIP_SCRIPT, json.dumps(folders), json.dumps(images), json.dumps(CAPTIONS)]
    subprocess.run(script, check=True, capture_output=True, timeout=300)
    for (name, run), folder in zip(runs.items(), folders):
        encoder = cliptune.load(str(run), device="cpu")
        want_images, want_texts = encoder.encode_images(images), encoder.encode_texts(CAPTIONS)
        assert np.abs(np.load(folder + "_images.npy") - want_images).max() <= 1e-5, name
        assert np.abs(np.load(folder + "_texts.npy") - want_texts).max() <= 1e-5, name
        back = cliptune.load(folder, device="cpu")  # cliptune reads the exported folder back
        assert np.abs(back.encode_images(images) - want_images).max() <= 1e-5, name


def _hf_embeddings(
    folder: Path, images: list[str], captions: list[str], **processor_options: str
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings as a transformers user computes them: from_pretrained model and AutoProcessor, nothing else.

    `backend="pil"` resizes with PIL, as open_clip does; transformers' default (torchvision on tensors) resamples
    slightly differently (pixel values up to ~0.015 apart).
    """
    model, processor = (
        AutoModel.from_pretrained(folder).eval(),
        AutoProcessor.from_pretrained(folder, **processor_options),
    )
    pictures = [Image.open(p).convert("RGB") for p in images]
    batch = processor(images=pictures, text=captions, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch["pixel_values"])
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = [x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text)]
    return tuple(torch.nn.functional.normalize(x, dim=-1).numpy() for x in pooled)


def test_open_clip_vit_to_clipmodel_with_alpha(vit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    report = cliptune.export(str(vit_run), "hf", out, alpha=0.5)
    assert report["max_abs_diff"] <= 1e-4
    assert isinstance(CLIPModel.from_pretrained(out), CLIPModel)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == "gelu" and config["text_config"]["eos_token_id"] == 49407
    images = _image_files(tmp_path / "images")
    encoder = cliptune.inference.Encoder(interpolated_model(vit_run, 0.5), device="cpu")
    want_images, want_texts = encoder.encode_images(images), encoder.encode_texts(CAPTIONS)
    got_images, got_texts = _hf_embeddings(out, images, CAPTIONS, backend="pil")
    assert np.abs(got_images - want_images).max() <= 1e-5
    assert np.abs(got_texts - want_texts).max() <= 1e-4
    default_images, _ = _hf_embeddings(out, images, CAPTIONS)  # torchvision resampling: close, not identical
    assert np.abs(default_images - want_images).max() <= 1e-3
    back = cliptune.load(str(out), device="cpu")  # the hf backend reads the folder back
    assert np.abs(back.encode_texts(CAPTIONS) - encoder.encode_texts(CAPTIONS)).max() <= 1e-4


def test_quickgelu_and_folded_linear_heads_to_hf_and_open_clip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tuned(add_heads(create("cliptune-tiny-vit", None, quick_gelu=True), "linear"))
    hf = cliptune.export(model, "hf", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vision_config"]["hidden_act"] == "quick_gelu"
    oc = cliptune.export(model, "open_clip", tmp_path / "oc")
    assert json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True
    assert hf["max_abs_diff"] <= 1e-4 and oc["max_abs_diff"] <= 1e-5
    images = _image_files(tmp_path / "images")
    got_images, got_texts = _hf_embeddings(tmp_path / "hf", images, CAPTIONS, backend="pil")
    encoder = cliptune.inference.Encoder(model, device="cpu")
    assert np.abs(got_images - encoder.encode_images(images)).max() <= 1e-4
    assert np.abs(got_texts - encoder.encode_texts(CAPTIONS)).max() <= 1e-4
    loaded = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")[0].eval()
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(CAPTIONS)
        assert np.abs(loaded.encode_text(tokens, normalize=True).numpy() - encoder.encode_texts(CAPTIONS)).max() <= 1e-5


@pytest.mark.parametrize("name", ["hf-clip", "hf-siglip"])
def test_hf_backend_save_pretrained_round_trip(backends, name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tuned(build_model(backends[name]))
    report = cliptune.export(model, "hf", tmp_path / "hf")
    assert report["max_abs_diff"] <= 1e-4
    back = cliptune.load(str(tmp_path / "hf"), device="cpu").model
    with torch.no_grad():
        tokens = model.tokenize(CAPTIONS)
        assert torch.allclose(back.encode_text(tokens), model.encode_text(tokens), atol=1e-5)
        pixels = torch.rand(2, 3, 32, 32)
        assert torch.allclose(back.encode_image(pixels), model.encode_image(pixels), atol=1e-5)


def test_formats_that_cannot_hold_a_model_say_why_and_which_can(backends) -> None:
    prompted = add_prompts(build_model(backends["openclip-vit"]), 2)
    with pytest.raises(ValueError, match=r"prompt tuning inserts 2 learned vectors.*exported as: cliptune, onnx"):
        cliptune.export(prompted, "open_clip", "unused")
    mlp = add_heads(build_model(backends["openclip-vit"]), "mlp")
    with pytest.raises(ValueError, match=r"MLP head is not linear.*exported as: cliptune, onnx"):
        cliptune.export(mlp, "hf", "unused")
    rn = build_model(backends["openclip-rn"])
    with pytest.raises(ValueError, match=r"ModifiedResNet.*exported as: cliptune, open_clip, onnx"):
        cliptune.export(rn, "hf", "unused")
    assert not Path("unused").exists()


def _captions() -> list[str]:
    """A few hundred captions: accents, scripts, emoji, punctuation, quotes, ligatures, full width, HTML, lengths."""
    words = ["a", "Dog", "café", "naïve", "日本語", "Ελληνικά", "🐶", "dog's", "it’s", "“hi”", "ﬁsh", "ＡＢＣ１"]
    words += ["hello!!!", "a,b;c", "R&amp;B", "&lt;tag&gt;", "x&amp;amp;y", "1234", "3.14", "e-mail", "#tag", "@you"]
    words += ["don't", "WE'LL", "\tTab", "new\nline", "  spaces  ", "São Paulo", "Zürich", "ß", "İstanbul", "😀👍"]
    rng = np.random.default_rng(0)
    captions = ["", " ", "!!!", "a", "word " * 100, "日本語 " * 60]
    for _ in range(300):
        captions.append(" ".join(rng.choice(words, size=int(rng.integers(1, 14)))))
    return captions


def test_clip_tokenizer_gives_open_clips_ids(tmp_path: Path) -> None:
    cliptune.export("cliptune-tiny-vit", "hf", tmp_path / "hf")
    captions = _captions()
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")(
        captions, padding="max_length", truncation=True, max_length=77, return_tensors="np"
    )
    ours = open_clip.get_tokenizer("ViT-B-32")(captions).numpy()
    content = theirs["attention_mask"] == 1
    ends = ours.argmax(axis=1)  # open_clip's <end_of_text> is the highest id
    np.testing.assert_array_equal(content, np.arange(77)[None, :] <= ends[:, None])
    np.testing.assert_array_equal(theirs["input_ids"][content], ours[content])


@pytest.mark.slow
def test_a_trained_run_exports_its_ema_weights_with_lora_merged(shapes, tmp_path: Path) -> None:
    cfg = run_config(shapes, tmp_path, epochs=1)
    cfg["finetune"] = {"ema_decay": 0.5, "lora": {"rank": 2}}
    run = Path(cliptune.finetune(cfg)["run_dir"])
    report = cliptune.export(str(run), "open_clip", tmp_path / "oc")
    weights = load_file(str(tmp_path / "oc" / "open_clip_model.safetensors"))
    assert not any("lora" in key for key in weights), "adapters are merged, not exported beside the weights"
    loaded = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")[0].eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(CAPTIONS)
    with torch.no_grad():
        got = loaded.encode_text(tokens, normalize=True).numpy()
    ema = cliptune.load(str(run), device="cpu").encode_texts(CAPTIONS)  # the run's model: EMA weights
    raw = cliptune.load(str(run / "model_raw"), device="cpu").encode_texts(CAPTIONS)
    assert np.abs(got - ema).max() <= 1e-5 and report["max_abs_diff"] <= 1e-5
    assert np.abs(got - raw).max() > 1e-4, "the raw (non-EMA) weights would embed differently"
