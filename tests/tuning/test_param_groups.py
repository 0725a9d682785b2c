"""Layer-wise lr decay groups (cliptune.tuning.param_groups) on tiny random models of every backend."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from cliptune.config import ModelConfig, OptimConfig, TowerConfig
from cliptune.models import build_model
from cliptune.models.base import ClipModel, Tower
from cliptune.models.wrapper import WrappedModel
from cliptune.tuning.param_groups import describe_groups, layer_id, no_decay, param_groups
from tests.helpers import tiny_config

LD = 0.5
LR = 1e-3


@pytest.fixture(scope="module")
def models(backends: dict[str, ModelConfig]):
    """name -> model, built on first use and shared by the tests that only read it."""
    cache: dict[str, ClipModel] = {}

    def get(name: str) -> ClipModel:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_model(backends[name])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def composed_with(backends: dict[str, ModelConfig]):
    """A composed model with the given image tower (random init) and the shared tiny BERT text tower."""
    bert = Path(backends["composed"].text_tower.name)
    return lambda image: build_model(tiny_config(bert, image=image))


def scales(model: ClipModel, cfg: OptimConfig) -> dict[str, tuple[float, float, float]]:
    """parameter name -> (lr, weight decay, lr scale) from the groups."""
    out = {}
    for g in param_groups(model, cfg):
        for name in g["names"]:
            out[name] = (g["lr"], g["weight_decay"], g["lr_scale"])
    return out


def ids(model: ClipModel, tower: Tower, prefix: str) -> set[tuple[int, int]]:
    """{(layer id, number of ids)} of the parameters under `prefix`, checking each is in `tower`."""
    found = set()
    for name, _ in model.named_parameters():
        if name.startswith(prefix):
            t, lid, n = layer_id(model, name)
            assert t == tower, name
            found.add((lid, n))
    assert found, f"no parameter under {prefix}"
    return found


# ---------------------------------------------------------------------------------------------------------------
# Layer ids on known architectures


def test_openclip_vit_scales(models) -> None:
    model = models("openclip-vit")
    n_blocks = len(model.model.visual.transformer.resblocks)
    got = scales(model, OptimConfig(lr=LR, layer_decay_image=LD))
    v = "model.visual."
    for stem in ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight"):
        assert got[v + stem][2] == pytest.approx(LD ** (n_blocks + 1)), stem
        assert got[v + stem][0] == pytest.approx(LR * LD ** (n_blocks + 1)), stem
    assert got[v + "transformer.resblocks.0.attn.in_proj_weight"][2] == pytest.approx(LD**n_blocks)
    assert got[v + f"transformer.resblocks.{n_blocks - 1}.mlp.c_fc.weight"][2] == pytest.approx(LD)
    for top in ("ln_post.weight", "ln_post.bias", "proj"):
        assert got[v + top][0] == LR and got[v + top][2] == 1.0, top
    assert layer_id(model, v + "conv1.weight") == ("image", 0, n_blocks + 2)
    assert layer_id(model, v + "proj") == ("image", n_blocks + 1, n_blocks + 2)
    # the text tower keeps its own (default: no) decay; the temperature is shared at scale 1
    assert {s for name, (_, _, s) in got.items() if not name.startswith(v)} == {1.0}
    assert layer_id(model, "model.logit_scale") == ("shared", 0, 1)


def test_openclip_resnet_ids(models) -> None:
    model = models("openclip-rn")
    v = "model.visual."
    for stem in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
        assert ids(model, "image", f"{v}{stem}.") == {(0, 6)}, stem
    for k in range(1, 5):
        assert ids(model, "image", f"{v}layer{k}.") == {(k, 6)}
    assert ids(model, "image", f"{v}attnpool.") == {(5, 6)}
    got = scales(model, OptimConfig(layer_decay_image=LD))
    assert got[v + "conv1.weight"][2] == pytest.approx(LD**5)
    assert got[v + "layer4.0.conv1.weight"][2] == pytest.approx(LD)
    assert got[v + "attnpool.c_proj.weight"][2] == 1.0


def test_openclip_text_ids(models) -> None:
    model = models("openclip-vit")
    n_blocks = len(model.model.transformer.resblocks)
    n = n_blocks + 2
    assert ids(model, "text", "model.token_embedding.") == {(0, n)}
    assert layer_id(model, "model.positional_embedding") == ("text", 0, n)
    for k in range(n_blocks):
        assert ids(model, "text", f"model.transformer.resblocks.{k}.") == {(k + 1, n)}
    assert ids(model, "text", "model.ln_final.") == {(n - 1, n)}
    assert layer_id(model, "model.text_projection") == ("text", n - 1, n)
    got = scales(model, OptimConfig(layer_decay_text=LD))
    assert got["model.token_embedding.weight"][2] == pytest.approx(LD ** (n_blocks + 1))
    assert got["model.visual.conv1.weight"][2] == 1.0  # the image tower's decay is separate


def test_hf_clip_towers(models) -> None:
    model = models("hf-clip")
    n_v = len(model.model.vision_model.encoder.layers)
    n_t = len(model.model.text_model.encoder.layers)
    vm, tm = "model.vision_model.", "model.text_model."
    assert ids(model, "image", vm + "embeddings.") == {(0, n_v + 2)}
    assert ids(model, "image", vm + "pre_layrnorm.") == {(0, n_v + 2)}
    for k in range(n_v):
        assert ids(model, "image", f"{vm}encoder.layers.{k}.") == {(k + 1, n_v + 2)}
    assert ids(model, "image", vm + "post_layernorm.") == {(n_v + 1, n_v + 2)}
    assert ids(model, "image", "model.visual_projection.") == {(n_v + 1, n_v + 2)}
    assert ids(model, "text", tm + "embeddings.") == {(0, n_t + 2)}
    assert ids(model, "text", f"{tm}encoder.layers.{n_t - 1}.") == {(n_t, n_t + 2)}
    assert ids(model, "text", tm + "final_layer_norm.") == {(n_t + 1, n_t + 2)}
    assert ids(model, "text", "model.text_projection.") == {(n_t + 1, n_t + 2)}
    got = scales(model, OptimConfig(layer_decay_image=LD, layer_decay_text=LD))
    assert got[vm + "embeddings.patch_embedding.weight"][2] == pytest.approx(LD ** (n_v + 1))
    assert got[tm + "embeddings.token_embedding.weight"][2] == pytest.approx(LD ** (n_t + 1))


def test_hf_siglip_heads_after_last_block(models) -> None:
    model = models("hf-siglip")
    n = len(model.model.vision_model.encoder.layers) + 2
    assert ids(model, "image", "model.vision_model.head.") == {(n - 1, n)}
    assert ids(model, "text", "model.text_model.head.") == {(n - 1, n)}
    assert layer_id(model, "model.logit_bias") == ("shared", 0, 1)


def test_composed_bert_and_timm_towers(models) -> None:
    model = models("composed")
    bert = "text_tower.model."
    n_t = len(model.text_tower.model.encoder.layer)
    assert ids(model, "text", bert + "embeddings.") == {(0, n_t + 2)}
    for k in range(n_t):
        assert ids(model, "text", f"{bert}encoder.layer.{k}.") == {(k + 1, n_t + 2)}
    assert ids(model, "text", bert + "pooler.") == {(n_t + 1, n_t + 2)}
    # timm test_resnet, grouped by timm's own group_matcher(coarse=False): one block per stage here
    assert ids(model, "image", "image_tower.conv1.") == {(0, 6)}
    assert ids(model, "image", "image_tower.bn1.") == {(0, 6)}
    for k in range(1, 5):
        assert ids(model, "image", f"image_tower.layer{k}.") == {(k, 6)}
    for head in ("image_projection.weight", "text_projection.weight", "logit_scale"):
        assert layer_id(model, head) == ("shared", 0, 1)


def test_timm_vit_final_norm_after_last_block(composed_with) -> None:
    # timm folds the final norm into the last block's group; here it counts as after the last block, as elsewhere.
    model = composed_with(TowerConfig(source="timm", name="test_vit", pretrained=False))
    n_blocks = len(model.image_tower.blocks)
    n = n_blocks + 2
    for stem in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert layer_id(model, f"image_tower.{stem}") == ("image", 0, n)
    assert ids(model, "image", f"image_tower.blocks.{n_blocks - 1}.") == {(n_blocks, n)}
    assert ids(model, "image", "image_tower.norm.") == {(n_blocks + 1, n)}


def test_efficientnet_lite0(composed_with) -> None:
    model = composed_with(TowerConfig(source="efficientnet-lite", name="efficientnet-lite0", pretrained=False))
    net = "image_tower.net."
    n_blocks = len(model.image_tower.net._blocks)
    assert n_blocks == 16
    n = n_blocks + 2
    assert ids(model, "image", net + "_conv_stem.") == ids(model, "image", net + "_bn0.") == {(0, n)}
    for k in range(n_blocks):
        assert ids(model, "image", f"{net}_blocks.{k}.") == {(k + 1, n)}
    assert ids(model, "image", net + "_conv_head.") == ids(model, "image", net + "_bn1.") == {(n - 1, n)}
    got = scales(model, OptimConfig(layer_decay_image=0.9))
    assert got[net + "_conv_stem.weight"][2] == pytest.approx(0.9**17)
    assert got[net + "_blocks.15._project_conv.weight"][2] == pytest.approx(0.9)


def test_torchvision_resnet18(composed_with) -> None:
    model = composed_with(TowerConfig(source="torchvision", name="resnet18", pretrained=False))
    assert ids(model, "image", "image_tower.conv1.") == ids(model, "image", "image_tower.bn1.") == {(0, 6)}
    for k in range(1, 5):
        assert ids(model, "image", f"image_tower.layer{k}.") == {(k, 6)}  # both blocks of the stage


# ---------------------------------------------------------------------------------------------------------------
# Groups: overrides, equivalence with the plain split, frozen parameters, coverage


def test_per_tower_lr_and_weight_decay(models) -> None:
    model = models("composed")
    cfg = OptimConfig(
        lr=1e-4, weight_decay=0.1, lr_image=2e-4, lr_text=3e-5, weight_decay_image=0.05, weight_decay_text=0.3
    )
    cfg.layer_decay_text = LD
    n_t = len(model.text_tower.model.encoder.layer)
    got = scales(model, cfg)
    assert got["image_tower.layer1.0.conv1.weight"] == (2e-4, 0.05, 1.0)
    assert got["image_tower.layer1.0.bn1.bias"] == (2e-4, 0.0, 1.0)
    emb = got["text_tower.model.embeddings.word_embeddings.weight"]
    assert emb[0] == pytest.approx(3e-5 * LD ** (n_t + 1)) and emb[1] == 0.3
    assert got["text_tower.model.pooler.dense.weight"] == (3e-5, 0.3, 1.0)
    assert got["image_projection.weight"] == (1e-4, 0.1, 1.0)
    assert got["logit_scale"] == (1e-4, 0.0, 1.0)


@pytest.mark.parametrize("name", ["openclip-vit", "openclip-rn", "hf-clip", "hf-siglip", "composed"])
def test_no_decay_matches_the_plain_split(models, name: str) -> None:
    model = models(name)
    cfg = OptimConfig(lr=3e-4, weight_decay=0.2)
    # the rule without layer decay: one lr, and weight decay unless the CLIP no-decay rule exempts the parameter
    plain = {
        id(p): (cfg.lr, 0.0 if no_decay(n, p) else cfg.weight_decay)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    ours = {}
    for g in param_groups(model, cfg):
        assert g["lr_scale"] == 1.0
        for p in g["params"]:
            ours[id(p)] = (g["lr"], g["weight_decay"])
    assert ours == plain


def test_frozen_excluded_and_each_parameter_in_one_group(models) -> None:
    model = models("hf-clip")
    frozen = {n for n, _ in model.named_parameters() if model.tower_of(n) == "image"}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    try:
        groups = param_groups(model, OptimConfig(layer_decay_text=LD))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for g in groups for p in g["params"]]
    names = [n for g in groups for n in g["names"]]
    assert len({id(p) for p in params}) == len(params)  # no parameter twice
    trainable = {n for n, _ in model.named_parameters()} - frozen
    assert sorted(names) == sorted(trainable)
    assert {g["tower"] for g in groups} == {"text", "shared"}
    assert all(len(g["params"]) == len(g["names"]) for g in groups)
    keys = [(g["tower"], g["layer_id"], g["weight_decay"] == 0) for g in groups]
    assert len(keys) == len(set(keys))  # one group per (tower, layer id, decay or not)


@pytest.mark.parametrize("name", ["openclip-rn", "composed"])
def test_every_trainable_parameter_in_exactly_one_group(models, name: str) -> None:
    model = models(name)
    groups = param_groups(model, OptimConfig(layer_decay_image=LD, layer_decay_text=0.7))
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    # the groups drive a real AdamW step
    opt = torch.optim.AdamW(groups, lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]


# ---------------------------------------------------------------------------------------------------------------
# Wrappers, added parameters, unknown architectures


class _Wrapped(WrappedModel):
    """A wrapper like the trainer's (heads, prompts): every name of the base gains a `base.` prefix."""


def test_stem_decays_whatever_the_wrapper_prefix(backends) -> None:
    """ITRA regression: it matched stem names before stripping its wrapper prefix, so the stem never decayed."""
    model = build_model(backends["openclip-vit"])
    n_v = len(model.model.visual.transformer.resblocks) + 2
    n_t = len(model.model.transformer.resblocks) + 2
    stem_v = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"]
    stem_t = ["token_embedding.weight", "positional_embedding"]
    for outer, model_ in (("", model), ("base.", _Wrapped(model))):
        got = scales(model_, OptimConfig(layer_decay_image=LD, layer_decay_text=LD))
        for name in stem_v:
            assert got[f"{outer}model.visual.{name}"][2] == pytest.approx(LD ** (n_v - 1)), name
        for name in stem_t:
            assert got[f"{outer}model.{name}"][2] == pytest.approx(LD ** (n_t - 1)), name
        assert got[f"{outer}model.visual.ln_post.weight"][2] == 1.0
        assert layer_id(model_, f"{outer}model.visual.conv1.weight") == ("image", 0, n_v)
    # names from a DDP / torch.compile wrapper around the model are stripped too
    for wrapper in ("module.", "_orig_mod."):
        assert layer_id(model, f"{wrapper}model.visual.conv1.weight") == ("image", 0, n_v)
        assert layer_id(model, f"{wrapper}model.token_embedding.weight") == ("text", 0, n_t)


def test_added_parameters_follow_their_module(models) -> None:
    model = build_model(ModelConfig(arch="cliptune-tiny-vit"))
    visual = model.model.visual
    n = len(visual.transformer.resblocks) + 2
    # LoRA-style adapters under a block's module, a prompt vector on the tower root, a new head on the model
    visual.transformer.resblocks[1].mlp.c_fc.register_parameter("lora_A", nn.Parameter(torch.zeros(2, 64)))
    visual.conv1.register_parameter("lora_B", nn.Parameter(torch.zeros(2, 2)))
    visual.register_parameter("prompt", nn.Parameter(torch.zeros(4, 64)))
    model.extra_head = nn.Linear(4, 4)
    assert layer_id(model, "model.visual.transformer.resblocks.1.mlp.c_fc.lora_A") == ("image", 2, n)
    assert layer_id(model, "model.visual.conv1.lora_B") == ("image", 0, n)
    assert layer_id(model, "model.visual.prompt") == ("image", n - 1, n)
    assert layer_id(model, "extra_head.weight") == ("shared", 0, 1)
    got = scales(model, OptimConfig(layer_decay_image=LD))
    assert got["model.visual.transformer.resblocks.1.mlp.c_fc.lora_A"][2] == pytest.approx(LD ** (n - 3))

    composed = models("composed")  # timm trunk: an adapter inside a block gets that block's id
    block = composed.image_tower.layer3[0].conv1
    block.register_parameter("lora_A", nn.Parameter(torch.zeros(2, 2)))
    try:
        assert layer_id(composed, "image_tower.layer3.0.conv1.lora_A") == ("image", 3, 6)
    finally:
        del block._parameters["lora_A"]


class _Odd(ClipModel):
    """A dual encoder made of modules nobody knows."""

    def __init__(self) -> None:
        super().__init__()
        self.eye = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4))
        self.ear = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        self.scale = nn.Parameter(torch.tensor(1.0))

    def tower_of(self, param_name: str) -> Tower:
        return {"eye": "image", "ear": "text"}.get(param_name.split(".")[0], "shared")

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        return {"image": [self.eye], "text": [self.ear], "shared": []}[tower]


def test_unknown_architecture_falls_back_to_one_id(caplog) -> None:
    model = _Odd()
    with caplog.at_level(logging.WARNING, logger="cliptune.tuning.param_groups"):
        assert layer_id(model, "eye.0.weight") == ("image", 0, 1)
        assert layer_id(model, "eye.2.weight") == ("image", 0, 1)
        groups = param_groups(model, OptimConfig(lr=LR, layer_decay_image=LD, layer_decay_text=LD))
    assert {g["lr"] for g in groups} == {LR} and {g["lr_scale"] for g in groups} == {1.0}
    warned = [r for r in caplog.records if "does not know" in r.getMessage()]
    assert [r.getMessage().split(" tower")[0].split()[-1] for r in warned] == ["image", "text"]  # once per tower


def test_describe_groups(models) -> None:
    groups = param_groups(models("composed"), OptimConfig(layer_decay_image=LD))
    table = describe_groups(groups)
    lines = table.splitlines()
    assert len(lines) == len(groups) + 2
    assert all(word in lines[0] for word in ("tower", "layer", "lr scale", "lr", "weight decay", "tensors", "params"))
    assert lines[1].split()[:3] == ["image", "0/5", f"{LD**5:.4g}"]
    total = sum(p.numel() for g in groups for p in g["params"])
    assert lines[-1].split()[-1] == f"{total:,}"
