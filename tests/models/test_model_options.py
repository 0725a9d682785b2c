"""model.image_size and model.drop_path through each backend's hooks: the same outputs at the same size, position
embeddings resampled as the tower's own library does it, a saved model that rebuilds at its new size, and drop
path that changes training outputs only."""

import dataclasses
import shutil

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from timm.layers import resample_abs_pos_embed
from torch import nn
from torchvision.models import ViT_B_16_Weights
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

import cliptune
from cliptune.api import resolve_config
from cliptune.config import ConfigError, ModelConfig, TowerConfig
from cliptune.models import build_model, load_model, save_model
from cliptune.models.towers import drop_path_blocks
from cliptune.train.setup import build_trainer
from tests.helpers import tiny_config

SUPPORTED = ("openclip-vit", "hf-clip", "hf-siglip", "composed-timm-vit")


@pytest.fixture(scope="module")
def configs(backends, bert_dir) -> dict[str, ModelConfig]:
    vit = TowerConfig(source="timm", name="test_vit", pretrained=False)
    return {**backends, "composed-timm-vit": tiny_config(bert_dir, image=vit)}


def _model(cfg: ModelConfig) -> cliptune.models.ClipModel:
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize("name", SUPPORTED)
def test_the_same_size_changes_nothing_and_a_larger_one_gives_finite_embeddings(configs, name, tmp_path):
    _same_size_changes_nothing_and_a_larger_one_rebuilds(configs[name], tmp_path)


def _same_size_changes_nothing_and_a_larger_one_rebuilds(cfg: ModelConfig, tmp_path, step: int = 16) -> None:
    model = _model(cfg)
    size = model.image_preprocessing().size
    images = _images(size)
    before = model.encode_image(images)
    model.set_image_size(size)
    assert torch.equal(model.eval().encode_image(images), before)
    larger = size + step
    model.set_image_size(larger)
    assert model.image_preprocessing().size == larger
    assert model.eval_transform(Image.new("RGB", (70, 90))).shape[-2:] == (larger, larger)
    out = model.eval().encode_image(_images(larger))
    assert out.shape == before.shape and torch.isfinite(out).all()
    loaded = load_model(save_model(model, tmp_path / "m"))  # the saved model records the size
    assert loaded.image_preprocessing().size == larger
    assert torch.equal(loaded.encode_image(_images(larger)), out)  # the same weights, bit for bit


def test_openclip_position_table_is_timms_resampling(configs):
    model = _model(configs["openclip-vit"])
    old = model.model.visual.positional_embedding.detach().clone()  # [1 + 4x4, width] for 32 px, patch 8
    model.set_image_size(48)
    expected = resample_abs_pos_embed(old[None], (6, 6), (4, 4), num_prefix_tokens=1, interpolation="bicubic")[0]
    torch.testing.assert_close(model.model.visual.positional_embedding.detach(), expected)


@pytest.mark.parametrize("name", ["hf-clip", "hf-siglip"])
def test_hf_resized_model_equals_transformers_on_the_fly_interpolation(configs, name):
    reference = _model(configs[name])
    model = _model(configs[name])
    model.set_image_size(48)
    images = _images(48)
    on_the_fly = reference.model.get_image_features(pixel_values=images, interpolate_pos_encoding=True)
    on_the_fly = getattr(on_the_fly, "pooler_output", on_the_fly)
    torch.testing.assert_close(model.encode_image(images, normalize=False), on_the_fly)


def test_openclip_resnet_resamples_its_attention_pool_grid_and_exports_at_the_new_size(configs, tmp_path):
    _same_size_changes_nothing_and_a_larger_one_rebuilds(configs["openclip-rn"], tmp_path, step=32)
    model = _model(configs["openclip-rn"])  # 64 px: a 2 x 2 grid after the ResNet's stride of 32
    old = model.model.visual.attnpool.positional_embedding.detach().clone()
    model.set_image_size(128)
    grid = old[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)  # independently: the grid as an image, resized
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    expected = torch.cat([old[:1], grid.permute(0, 2, 3, 1).reshape(16, -1)])  # the mean-pooled token kept
    torch.testing.assert_close(model.model.visual.attnpool.positional_embedding.detach(), expected)
    out = model.eval().encode_image(_images(128))
    folder = cliptune.export(model, "open_clip", tmp_path / "oc")["out"]  # open_clip alone rebuilds it at 128 px
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert preprocess(Image.new("RGB", (70, 90))).shape[-2:] == (128, 128)
    torch.testing.assert_close(F.normalize(loaded.eval().encode_image(_images(128)), dim=-1), out)
    with pytest.raises(ValueError, match=r"model.image_size: 100 px .*multiple of 32 \(e.g. 96\)"):
        model.set_image_size(100)


def test_unsupported_towers_say_who_supports_them(configs, shapes, tmp_path):
    with pytest.raises(
        NotImplementedError, match=r"model.drop_path .*timm, efficientnet-lite, torchvision .* or Hugging Face"
    ):
        _model(configs["openclip-rn"]).set_drop_path(0.1)
    cfg = {
        "model": {"arch": "cliptune-tiny-rn", "drop_path": 0.1},
        "data": {"train": {"path": str(shapes / "train.csv")}},
        "runtime": {"output_dir": str(tmp_path), "progress": False},
    }
    with pytest.raises(ConfigError, match=r"model.drop_path"):
        cliptune.finetune(resolve_config(cfg))


@pytest.mark.parametrize("name", SUPPORTED)
def test_drop_path_changes_training_outputs_only(configs, name):
    model = _model(configs[name])
    size = model.image_preprocessing().size
    images = _images(size, n=8)
    keys = set(model.state_dict())
    before = model.encode_image(images)
    assert model.set_drop_path(0.5) > 0
    assert set(model.state_dict()) == keys  # nothing new is saved
    assert torch.equal(model.eval().encode_image(images), before)
    model.train()
    trained = model.encode_image(images)
    assert torch.isfinite(trained).all() and not torch.allclose(trained, before)
    if name != "composed-timm-vit":  # rate 0 removes the hooks (timm's towers are rebuilt instead)
        model.set_drop_path(0.0)
        torch.testing.assert_close(model.encode_image(images), before)


def test_a_run_at_a_new_size_saves_a_model_of_that_size(shapes, tmp_path):
    cfg = {
        "name": "resized",
        "model": {"arch": "cliptune-tiny-vit", "image_size": 48, "drop_path": 0.1},
        "data": {"train": {"path": str(shapes / "train.csv")}},
        "train": {"epochs": 1, "batch_size": 32},
        "runtime": {"output_dir": str(tmp_path), "progress": False},
    }
    cliptune.finetune(cfg)
    model = cliptune.load(tmp_path / "resized").model
    assert model.spec()["image_size"] == [48, 48] and model.image_preprocessing().size == 48
    assert model.encode_image(_images(48)).shape == (3, 64)


CNN_TOWERS = {
    "composed-lite": TowerConfig(source="efficientnet-lite", name="efficientnet-lite0", pretrained=False),
    "composed-torchvision-cnn": TowerConfig(source="torchvision", name="efficientnet_b0", pretrained=False),
}


@pytest.fixture(scope="module")
def cnn_configs(bert_dir) -> dict[str, ModelConfig]:
    return {name: tiny_config(bert_dir, image=tower) for name, tower in CNN_TOWERS.items()}


@pytest.mark.parametrize("name", list(CNN_TOWERS))
def test_convolutional_towers_take_a_new_size_and_rebuild_at_it(cnn_configs, name, tmp_path):
    _same_size_changes_nothing_and_a_larger_one_rebuilds(cnn_configs[name], tmp_path)


def _tiny_torchvision_vit(weights: ViT_B_16_Weights | None = None, progress: bool = True, **kwargs) -> nn.Module:
    """vit_b_16's builder at toy width (the annotation is how torchvision finds the weights enum)."""
    kwargs.setdefault("image_size", 224)
    return VisionTransformer(patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=37, **kwargs)


def test_torchvision_vit_resamples_its_position_embeddings_as_torchvision_does(bert_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(torchvision.models._api.BUILTIN_MODELS, "vit_b_16", _tiny_torchvision_vit)
    # torchvision lists a builder as a classification model by the module that defines it
    monkeypatch.setattr(_tiny_torchvision_vit, "__module__", VisionTransformer.__module__)
    cfg = tiny_config(bert_dir, image=TowerConfig(source="torchvision", name="vit_b_16", pretrained=False))
    _same_size_changes_nothing_and_a_larger_one_rebuilds(cfg, tmp_path)
    model = _model(cfg)
    expected = interpolate_embeddings(240, 16, model.image_tower.state_dict())["encoder.pos_embedding"]
    model.set_image_size(240)
    torch.testing.assert_close(model.image_tower.encoder.pos_embedding.detach(), expected)


@pytest.mark.parametrize("name", list(CNN_TOWERS))
def test_convolutional_drop_path_changes_training_outputs_only(cnn_configs, name):
    """BatchNorm trains on batch statistics, so training outputs are compared with drop path on and off."""
    model = _model(cnn_configs[name])
    images = _images(model.image_preprocessing().size, n=4)
    keys, before = set(model.state_dict()), model.encode_image(images)
    assert model.set_drop_path(0.5) > 0
    assert set(model.state_dict()) == keys
    assert torch.equal(model.eval().encode_image(images), before)
    torch.manual_seed(1)
    dropped = model.train().encode_image(images)
    model.set_drop_path(0.0)
    plain = model.encode_image(images)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)


def test_lite_drop_path_is_the_library_built_with_that_rate(cnn_configs):
    from efficientnet_lite_pytorch import EfficientNet

    model = _model(cnn_configs["composed-lite"])
    reference = EfficientNet.from_name("efficientnet-lite0", drop_connect_rate=0.3)
    reference._fc = torch.nn.Identity()
    reference.load_state_dict(model.image_tower.net.state_dict())
    model.set_drop_path(0.3)
    images = _images(224, n=4)
    torch.manual_seed(2)
    ours = model.image_tower.train()(images)
    torch.manual_seed(2)
    theirs = reference.train().extract_features(images).mean((2, 3))
    torch.testing.assert_close(ours, theirs)


def test_towers_without_the_mechanism_name_the_key_and_the_tower(bert_dir, hf_towers):
    resnet = tiny_config(bert_dir, image=TowerConfig(source="torchvision", name="resnet18", pretrained=False))
    with pytest.raises(ValueError, match=r"model.drop_path: torchvision model 'resnet18' has no stochastic depth"):
        _model(resnet).set_drop_path(0.1)
    vit = _model(hf_towers["vit"])  # transformers' ViT has no drop path
    with pytest.raises(ValueError, match=r"model.drop_path: Hugging Face image tower '.*hf-vit' \(ViTModel\) has no"):
        vit.set_drop_path(0.1)
    levit = _model(hf_towers["levit"])  # attention biases fixed to the input grid, and no interpolate_pos_encoding
    with pytest.raises(ValueError, match=r"model.image_size: Hugging Face image tower .*LevitModel, which has no"):
        levit.set_image_size(64)


def _save_hf(folder, model: nn.Module):
    torch.manual_seed(0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_towers(bert_dir, tmp_path_factory):
    """Composed models with tiny random transformers image towers, saved as hub folders."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        LevitConfig,
        LevitModel,
        ViTConfig,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("hf-towers")
    small = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    levit = LevitConfig(
        image_size=32, patch_size=16, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 1, 1], depths=[1, 1, 1]
    )
    models = {
        "vit": ViTModel(ViTConfig(**small, intermediate_size=37)),
        "dinov2": Dinov2Model(Dinov2Config(**small, intermediate_size=37)),
        "dinov2-dropping": Dinov2Model(Dinov2Config(**small, intermediate_size=37, drop_path_rate=0.2)),
        "levit": LevitModel(levit),
    }
    yield {
        name: tiny_config(bert_dir, image=TowerConfig(source="hf", name=str(_save_hf(root / f"hf-{name}", model))))
        for name, model in models.items()
    }
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_hf_image_towers_take_a_new_size_and_rebuild_at_it(hf_towers, name, tmp_path):
    _same_size_changes_nothing_and_a_larger_one_rebuilds(hf_towers[name], tmp_path)


def test_hf_vit_tower_at_a_new_size_equals_a_vit_built_at_it_with_a_bicubic_resized_table(hf_towers):
    from transformers import ViTModel

    model = _model(hf_towers["vit"])
    vit = model.image_tower.model
    old = vit.embeddings.position_embeddings.detach()  # [1, 1 + 4 x 4, 32]: 32 px, patch 8
    grid = F.interpolate(old[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic")
    state = vit.state_dict()
    state["embeddings.position_embeddings"] = torch.cat([old[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 36, -1)], 1)
    config = vit.config.to_dict() | {"image_size": 48}
    reference = ViTModel(type(vit.config).from_dict(config)).eval()
    reference.load_state_dict(state)
    model.set_image_size(48)
    images = _images(48)
    with torch.no_grad():
        torch.testing.assert_close(model.image_trunk(images), reference(pixel_values=images).last_hidden_state[:, 0])


def test_hf_tower_drop_path_is_its_own_stochastic_depth_in_training_only(hf_towers, tmp_path):
    model = _model(hf_towers["dinov2"])
    images = _images(32, n=8)
    keys, before = set(model.state_dict()), model.encode_image(images)
    assert model.set_drop_path(0.5) == 2  # DINOv2: the same rate on each of the 2 layers' residual branches
    assert set(model.state_dict()) == keys
    assert torch.equal(model.eval().encode_image(images), before)
    dropped = model.train().encode_image(images)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, before)
    loaded = load_model(save_model(model, tmp_path / "m"))  # drop path is a training setting: not saved
    assert not any("DropPath" in type(m).__name__ for m in loaded.modules())
    assert torch.equal(loaded.train().encode_image(images), before)


def _run_config(model: ModelConfig, drop_path: float, shapes, out) -> dict:
    return {
        "model": {**dataclasses.asdict(model), "drop_path": drop_path},
        "data": {"train": {"path": str(shapes / "train.csv")}},
        "runtime": {"output_dir": str(out), "progress": False},
    }


@pytest.mark.parametrize("tower", ["efficientnet-lite", "torchvision", "hf"])
def test_model_drop_path_0_turns_off_the_drop_path_a_tower_is_built_with(
    cnn_configs, hf_towers, shapes, tmp_path, tower
):
    """efficientnet-lite is built with drop connect 0.2, torchvision's efficientnet_b0 with stochastic depth 0.2,
    and a Hugging Face config may set drop_path_rate: a run's model.drop_path, 0 included, is what trains."""
    cfg = {
        "efficientnet-lite": cnn_configs["composed-lite"],
        "torchvision": cnn_configs["composed-torchvision-cnn"],
        "hf": hf_towers["dinov2-dropping"],
    }[tower]
    built = _model(cfg)
    assert drop_path_blocks(built.image_tower) > 0  # the library's own default
    images = _images(built.image_preprocessing().size, n=4)
    expected = built.encode_image(images)
    for rate in (0.0, 0.3):
        model = build_trainer(resolve_config(_run_config(cfg, rate, shapes, tmp_path / str(rate)))).model
        assert (drop_path_blocks(model.image_tower) > 0) == (rate > 0)
        model.load_state_dict(built.state_dict())  # the same weights: evaluation is unchanged by drop path
        assert torch.equal(model.eval().encode_image(images), expected)
        if tower != "torchvision":  # torchvision's classifier dropout (kept before the removed Linear) is random too
            model.train()  # BatchNorm normalises by batch statistics: deterministic unless something drops
            assert torch.equal(model.encode_image(images), model.encode_image(images)) == (rate == 0)
