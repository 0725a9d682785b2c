"""The OpenCLIP backend: tiny packaged architectures, the interface, save/load, locking, and clear errors."""

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from cliptune.config import FinetuneConfig, ModelConfig
from cliptune.losses import clip_loss
from cliptune.models import ModelError, build_model, load_model, save_model
from cliptune.models.openclip import TINY_ARCHS
from cliptune.tuning.locking import apply_locking

ARCHS = ["cliptune-tiny-vit", "cliptune-tiny-rn"]


def _images(model, n=4, seed=0):
    size = model.model.visual.preprocess_cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=ARCHS)
def model(request):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=request.param)).eval()


def test_tiny_archs_are_registered():
    assert set(ARCHS) <= set(TINY_ARCHS)


def test_shapes_and_normalisation(model):
    img = model.encode_image(_images(model))
    txt = model.encode_text(model.tokenize(["a red circle", "a blue square", "x", "a very long caption " * 3]))
    assert img.shape == (4, 64) and txt.shape == (4, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    assert model.tokenize(["a"]).shape == (1, 77)


def test_every_parameter_belongs_to_a_tower(model):
    towers = {name: model.tower_of(name) for name, _ in model.named_parameters()}
    assert towers["model.logit_scale"] == "shared"
    assert all(t == "image" for n, t in towers.items() if n.startswith("model.visual."))
    assert towers["model.token_embedding.weight"] == "text" and towers["model.text_projection"] == "text"
    assert set(towers.values()) == {"image", "text", "shared"}


def test_save_load_gives_identical_embeddings(model, tmp_path):
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    images, tokens = _images(model), model.tokenize(["a red circle", "two blue squares"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), again.encode_image(images))
        assert torch.equal(model.encode_text(tokens), again.encode_text(tokens))
    assert again.spec() == model.spec()


def test_locked_image_tower_only_text_and_temperature_change(model):
    locked = apply_locking(model, FinetuneConfig(lock_image=True))
    assert locked == ["image"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    tokens = model.tokenize(["a", "b", "c", "d"])
    for _ in range(3):
        opt.zero_grad()
        clip_loss(model.encode_image(_images(model)), model.encode_text(tokens), model.logit_scale).backward()
        opt.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        if model.tower_of(name) == "image":
            assert not changed, name
    assert not torch.equal(before["model.logit_scale"], model.logit_scale)
    assert not torch.equal(before["model.token_embedding.weight"], model.model.token_embedding.weight)


def test_local_checkpoint_file_is_loaded(model, tmp_path):
    arch = model.arch
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(path))
    again = build_model(ModelConfig(arch=arch, pretrained=str(path))).eval()
    images = _images(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), again.encode_image(images))


def test_unknown_arch_lists_close_matches():
    with pytest.raises(ModelError, match=r"'ViT-B-23' is not an OpenCLIP architecture\. Close matches: .*ViT-B-32"):
        build_model(ModelConfig(arch="ViT-B-23"))


def test_unknown_tag_and_missing_file():
    with pytest.raises(ModelError, match=r"known tags for RN50: .*openai"):
        build_model(ModelConfig(arch="RN50", pretrained="opneai"))
    with pytest.raises(ModelError, match=r"checkpoint file '/nowhere/x.pt' does not exist"):
        build_model(ModelConfig(arch="RN50", pretrained="/nowhere/x.pt"))


def test_offline_hub_gives_an_actionable_error(offline_hub):
    # A published tag: with the hub switched off by the fixture, the download fails at once, never reaching out.
    tag = open_clip.list_pretrained_tags_by_model("RN50")[0]
    with pytest.raises(ModelError, match=r"hub is unreachable.*set model.pretrained to the local file path"):
        build_model(ModelConfig(arch="RN50", pretrained=tag))


def test_text_runs_over_the_longest_caption_only_with_identical_output(model):
    captions = ["a", "a red circle on a white background", "two " * 40]  # the last one fills the whole context
    for batch in (captions[:2], captions):
        tokens = model.tokenize(batch)
        with torch.no_grad():
            ours = model.encode_text(tokens)
            full = model.model.encode_text(tokens, normalize=True)
        torch.testing.assert_close(ours, full, atol=1e-6, rtol=0)
    calls = []
    hook = model.model.transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    with torch.no_grad():
        model.encode_text(model.tokenize(captions[:2]))
    hook.remove()
    assert calls == [9], "the text transformer ran over more than the longest caption (7 words + start + end)"
