"""model.image_size and model.drop_path through each backend's hooks: the same outputs at the same size, position
embeddings resampled as the tower's own library does it, a saved model that rebuilds at its new size, and drop
path that changes training outputs only."""

import pytest
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed

import cliptune
from cliptune.api import resolve_config
from cliptune.config import ConfigError, ModelConfig, TowerConfig
from cliptune.models import build_model, load_model, save_model
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
    model = _model(configs[name])
    size = model.image_preprocessing().size
    images = _images(size)
    before = model.encode_image(images)
    model.set_image_size(size)
    assert torch.equal(model.eval().encode_image(images), before)
    larger = size + 16
    model.set_image_size(larger)
    assert model.image_preprocessing().size == larger
    assert model.eval_transform(Image.new("RGB", (70, 90))).shape[-2:] == (larger, larger)
    out = model.eval().encode_image(_images(larger))
    assert out.shape == before.shape and torch.isfinite(out).all()
    loaded = load_model(save_model(model, tmp_path / "m"))  # the saved model records the size
    assert loaded.image_preprocessing().size == larger
    torch.testing.assert_close(loaded.encode_image(_images(larger)), out)


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


def test_unsupported_towers_say_who_supports_them(configs, shapes, tmp_path):
    with pytest.raises(NotImplementedError, match=r"model.image_size .*OpenCLIP ViTs"):
        _model(configs["openclip-rn"]).set_image_size(64)
    with pytest.raises(NotImplementedError, match=r"model.drop_path .*timm image tower"):
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
