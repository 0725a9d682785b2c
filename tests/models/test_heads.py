"""New linear/MLP heads on any model: identity at init, tower bookkeeping, save/load, and head-only training with
both towers locked and their trunks cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cliptune.config import FinetuneConfig, ModelConfig
from cliptune.features import can_cache
from cliptune.features.encoding import Encoding
from cliptune.losses import clip_loss
from cliptune.models import ClipModel, ModelError, build_model, load_model, rebuild, save_model
from cliptune.models.heads import HeadedModel, add_heads
from cliptune.tuning.locking import apply_locking, set_train_mode
from tests.helpers import CAPTIONS

NAMES = ["openclip-vit", "openclip-rn", "hf-clip", "hf-siglip", "composed"]
KINDS = ["linear", "mlp"]
# every backend once and each kind on several: a training case costs seconds on a busy CPU
TRAINED = [("openclip-vit", "linear"), ("openclip-rn", "mlp"), ("hf-clip", "mlp"), ("hf-siglip", "linear")]
TRAINED += [("composed", "mlp")]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20)]


def pictures() -> list[Image.Image]:
    return [Image.new("RGB", (40, 40), c) for c in COLOURS]


def pixels(model: ClipModel) -> torch.Tensor:
    return torch.stack([model.eval_transform(p) for p in pictures()])


def embeddings(model: ClipModel) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.encode_image(pixels(model)), model.encode_text(model.tokenize(CAPTIONS))


def perturb(model: HeadedModel) -> None:
    """Move the heads away from the identity, so a test can tell heads that were saved from fresh ones."""
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.fixture(scope="module")
def bases(backends) -> dict[str, ClipModel]:
    torch.manual_seed(0)
    return {name: build_model(backends[name]).eval() for name in NAMES}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_heads_start_as_the_identity(bases, name: str, kind: str) -> None:
    base = bases[name]
    model = add_heads(base, kind)
    base_image, base_text = embeddings(base)
    image, text = embeddings(model)
    # the heads return their input exactly; only re-normalising a unit vector may move the last bit
    assert torch.equal(model.image_head(base_image), base_image)
    assert torch.equal(model.text_head(base_text), base_text)
    assert torch.allclose(image, base_image, atol=1e-6) and torch.allclose(text, base_text, atol=1e-6)
    assert model.logit_scale is base.logit_scale
    assert torch.equal(model.tokenize(CAPTIONS), base.tokenize(CAPTIONS))
    assert model.eval_transform is base.eval_transform and model.train_transform is base.train_transform


@pytest.mark.parametrize("name", NAMES)
def test_towers_of_the_wrapped_model(bases, name: str) -> None:
    base = bases[name]
    model = add_heads(base, "mlp")
    for full, _ in model.named_parameters():
        if full.startswith("heads."):
            assert model.tower_of(full) == "shared"
        elif name != "composed":
            assert model.tower_of(full) == base.tower_of(full.removeprefix("base."))
    assert model.tower_of("base." + next(n for n, _ in base.named_parameters() if "logit_scale" in n)) == "shared"
    assert model.tower_modules("image")[: len(base.tower_modules("image"))] == base.tower_modules("image")
    assert model.heads in model.tower_modules("shared")
    assert model.spec() == {"backend": "heads", "heads": "mlp", "base": base.spec()}


def test_a_composed_models_projections_join_their_trunks(bases) -> None:
    base = bases["composed"]
    model = add_heads(base, "linear")
    # The base's projections are shared in the base, but inside the wrapper's trunks: locked and cached with them.
    assert model.tower_of("base.image_projection.weight") == "image"
    assert model.tower_of("base.text_projection.weight") == "text"
    assert model.tower_modules("image") == [base.image_tower, base.image_projection]
    assert model.tower_modules("text") == [base.text_tower, base.text_projection]
    assert model.tower_modules("shared") == [model.heads]


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(bases, name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = add_heads(bases[name], "mlp" if name != "openclip-rn" else "linear")  # wrapping leaves the base as it was
    perturb(model)
    loaded = load_model(save_model(model, tmp_path / "saved"))
    assert isinstance(loaded, HeadedModel) and loaded.spec() == model.spec()
    for got, want in zip(embeddings(loaded), embeddings(model)):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("name", "kind"), TRAINED)
def test_locked_towers_train_only_heads_and_temperature(backends, name: str, kind: str) -> None:
    torch.manual_seed(0)
    model = add_heads(build_model(backends[name]), kind)
    assert apply_locking(model, FinetuneConfig(lock_image=True, lock_text=True)) == ["image", "text"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n, _ in model.named_parameters() if n.startswith("heads.")}
    scale = next(n for n, p in model.named_parameters() if p is model.logit_scale)
    bias = {n for n, p in model.named_parameters() if p is model.logit_bias}
    assert trainable == heads | {scale} | bias
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, tokens = pixels(model), model.tokenize(CAPTIONS)
    for _ in range(3):
        set_train_mode(model, ["image", "text"])
        loss = clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == heads | {scale}  # SigLIP's logit_bias gets no gradient from the softmax loss


def test_locked_trunks_are_cached(bases, tmp_path: Path) -> None:
    model = add_heads(bases["composed"], "mlp")
    perturb(model)
    assert can_cache(model, "image") and can_cache(model, "text")
    files = []
    for i, picture in enumerate(pictures()):
        files.append(tmp_path / f"{i}.png")
        picture.save(files[-1])
    cached, plain = Encoding(model, cached=["image", "text"]), Encoding(model)
    assert torch.allclose(cached.images(files), plain.images(files), atol=1e-6)
    assert torch.allclose(cached.texts(CAPTIONS), plain.texts(CAPTIONS), atol=1e-6)
    assert len(cached.trunks.memo["image"]) == len(files) and len(cached.trunks.memo["text"]) == len(CAPTIONS)


def test_unknown_kinds_and_building_from_a_config_are_clear_errors(bases) -> None:
    with pytest.raises(ModelError, match=r"finetune\.heads: 'deep' is unknown; choose one of linear, mlp"):
        add_heads(bases["openclip-vit"], "deep")
    with pytest.raises(ModelError, match=r"finetune\.heads"):
        build_model(ModelConfig(backend="heads"))


def test_rebuild_from_spec_without_a_folder_for_openclip(bases) -> None:
    model = add_heads(bases["openclip-vit"], "linear")
    again = rebuild(model.spec())
    assert isinstance(again, HeadedModel) and again.spec() == model.spec()
    assert set(again.state_dict()) == set(model.state_dict())
