"""The openclip backend with a Hugging Face text tower (open_clip configs naming `hf_model_name` in `text_cfg`, like
roberta-ViT-B-32), offline: a tiny random BERT saved with `save_pretrained` and a tiny open_clip config naming its
folder, registered with open_clip as cliptune registers its packaged tiny architectures."""

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from safetensors.torch import load_file
from torch import nn
from transformers import BertModel, BertTokenizer

import cliptune
from cliptune.config import LoraConfig, ModelConfig
from cliptune.losses.clip import clip_loss
from cliptune.models import build_model, load_model, save_model
from cliptune.train.logging import step_losses
from cliptune.tuning.lora import apply_lora
from tests.helpers import CAPTIONS, save_tiny_bert, tiny_run

ARCH = "cliptune-test-hf-text"
CONTEXT = 24
LAYERS = 2  # save_tiny_bert's


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    """The tiny BERT folder the registered config names (its own copy: a test moves it away)."""
    root = tmp_path_factory.mktemp("hf-text")
    folder = save_tiny_bert(root / "bert")
    text = {
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        "context_length": CONTEXT,
    }
    vision = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
    (root / "configs").mkdir()
    arch = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    (root / "configs" / f"{ARCH}.json").write_text(json.dumps(arch))
    open_clip.add_model_config(root / "configs")  # as models/openclip.py registers cliptune-tiny-vit
    yield folder
    open_clip.factory._MODEL_CONFIGS.pop(ARCH, None)  # other tests list open_clip's architectures
    shutil.rmtree(root)


def test_builds_and_encodes_as_the_hugging_face_model_it_names(bert):
    model = build_model(ModelConfig(arch=ARCH)).eval()
    assert isinstance(model.model.text, HFTextEncoder)
    tokens = model.tokenize(CAPTIONS)
    # independent: the folder's own tokenizer and BertModel (transformers alone), mean-pooled over the padding mask
    hf = BertTokenizer.from_pretrained(bert)(CAPTIONS, padding="max_length", max_length=CONTEXT, return_tensors="pt")
    assert torch.equal(tokens, hf.input_ids)
    reference = BertModel.from_pretrained(bert, add_pooling_layer=False).eval()
    with torch.no_grad():
        states = reference(input_ids=hf.input_ids, attention_mask=hf.attention_mask).last_hidden_state
        mask = hf.attention_mask[..., None].float()
        expected = F.normalize(model.model.text.proj((states * mask).sum(1) / mask.sum(1)), dim=-1)
        torch.testing.assert_close(model.encode_text(tokens), expected, atol=1e-5, rtol=1e-5)
        assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    long = " ".join(["a red square"] * 10)  # 30 words: over the 24-token context
    found = model.text_overflow([CAPTIONS[0], long])
    assert (found.truncated, found.context_length, found.first) == (1, CONTEXT, 1)
    assert model.export_formats() == ("cliptune", "open_clip", "onnx")  # no CLIPModel holds a BERT text tower


def test_layer_groups_and_lora_targets_find_the_bert_blocks(bert):
    model = build_model(ModelConfig(arch=ARCH))
    text = model.layer_groups("text")
    assert (text.kind, text.prefix, text.num_layers) == ("hf-BertModel", "model.text.transformer.", LAYERS)
    for name, layer in (
        ("model.text.transformer.embeddings.word_embeddings.weight", 0),
        ("model.text.transformer.encoder.layer.0.attention.self.query.weight", 1),
        ("model.text.transformer.encoder.layer.1.output.dense.weight", 2),
        ("model.text.proj.weight", LAYERS + 1),
    ):
        assert text.layer_of(name) == layer, name
    assert model.layer_groups("image").num_layers == 2  # open_clip's own ViT, beside it
    blocks = model.model.text.transformer.encoder
    # independent: every Linear inside a BERT block, and nothing outside the blocks (embeddings, projection)
    linears = {f"model.text.transformer.encoder.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)}
    adapted = apply_lora(model, LoraConfig(rank=2))
    assert {n for n in adapted if n.startswith("model.text.")} == linears and len(linears) == 6 * LAYERS
    parts = ("attn", "mlp.c_fc", "mlp.c_proj")
    image = {f"model.visual.transformer.resblocks.{i}.{p}" for i in range(2) for p in parts}
    assert {n for n in adapted if not n.startswith("model.text.")} == image


def test_a_run_trains_the_text_tower_through_the_loop(bert, shapes, tmp_path):
    cfg = tiny_run(shapes, tmp_path, model={"arch": ARCH}, optim={"layer_decay_text": 0.8, "layer_decay_image": 0.8})
    out = cliptune.finetune(cfg)
    assert out["run"]["steps"] == 6
    losses = step_losses(out["run_dir"])
    assert losses and torch.isfinite(torch.tensor(losses)).all()
    trained = load_file(str(Path(out["run_dir"]) / "model" / "model.safetensors"))
    initial = BertModel.from_pretrained(bert).state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(trained[f"model.text.transformer.{key}"], initial[key])
    reloaded = cliptune.load(out["run_dir"])
    assert reloaded.encode_texts(CAPTIONS[:2]).shape == (2, 16)


def test_save_and_load_round_trip_without_the_hub_folder(bert, tmp_path, offline_hub):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=ARCH))
    images, tokens = torch.randn(4, 3, 32, 32), model.tokenize(CAPTIONS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale.exp()).backward()
    optimizer.step()  # saved weights now differ from the folder's: loading must not fetch the folder's again
    save_model(model.eval(), tmp_path / "saved")
    away = bert.with_name("moved")
    bert.rename(away)  # the config's hf_model_name is gone, as a hub name is offline
    try:
        loaded = load_model(tmp_path / "saved")
    finally:
        away.rename(bert)
    assert torch.equal(loaded.tokenize(CAPTIONS), tokens)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
