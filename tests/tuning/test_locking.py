"""Whole-tower and partial locking: whole-component pattern matching, trainable sets per backend, the seed-000 RN50
recipe, clear errors for patterns that match nothing, and BatchNorm statistics frozen in a locked part."""

from __future__ import annotations

import logging

import pytest
import torch

from cliptune.config import ConfigError, FinetuneConfig, ModelConfig
from cliptune.models import ClipModel, build_model
from cliptune.models.openclip import create
from cliptune.tuning.locking import (
    apply_locking,
    display_name,
    matches,
    parse_patterns,
    set_train_mode,
    trainable_groups,
    trainable_summary,
)

BACKENDS = ["openclip-vit", "openclip-rn", "hf-clip", "hf-siglip", "composed"]
# A pattern per backend that hits part of the image tower, and one that hits the text token embeddings.
IMAGE_PART = {
    "openclip-vit": "resblocks.1",
    "openclip-rn": "layer4",
    "hf-clip": "layers.1",
    "hf-siglip": "layers.1",
    "composed": "layer4",
}
TOKEN_EMBEDDING = {
    "openclip-vit": "token_embedding",
    "openclip-rn": "token_embedding",
    "hf-clip": "embeddings.token_embedding",
    "hf-siglip": "embeddings.token_embedding",
    "composed": "word_embeddings",
}


def _contains(name: str, part: str) -> bool:
    # the rule, restated independently: whole dotted components, anywhere in the name
    return f".{part}." in f".{name}."


def trainable(model: ClipModel) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names_of(model: ClipModel, tower: str) -> set[str]:
    return set(model.tower_parameters(tower))


@pytest.fixture(scope="module")
def rn50() -> ClipModel:
    """OpenCLIP RN50 at random init (its text transformer has 12 blocks); tests reset requires_grad first."""
    return create("RN50", None)


def unlock_all(model: ClipModel) -> ClipModel:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Matching


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("resblocks.1", "model.visual.transformer.resblocks.1.attn.in_proj_weight", True),
        ("resblocks.1", "model.visual.transformer.resblocks.10.attn.in_proj_weight", False),
        ("resblocks.1", "model.visual.transformer.resblocks.11.mlp.c_fc.bias", False),
        ("resblocks.1.attn", "model.transformer.resblocks.1.attn.out_proj.weight", True),
        ("resblocks.1.mlp", "model.transformer.resblocks.1.attn.out_proj.weight", False),
        ("layer4", "model.visual.layer4.0.conv1.weight", True),
        ("layer4", "model.visual.layer40.0.conv1.weight", False),
        ("visual.layer4", "model.visual.layer4.0.bn1.bias", True),
        ("model.visual.layer4", "model.visual.layer4.0.bn1.bias", True),  # a full name copied from named_parameters
        ("layer4", "module.base.model.visual.layer4.0.bn1.bias", True),  # DDP around heads around OpenCLIP
        ("ln", "model.transformer.resblocks.0.ln_1.weight", False),
        ("attnpool", "model.visual.attnpool.c_proj.weight", True),
        ("positional_embedding", "model.visual.attnpool.positional_embedding", True),
        ("token_embedding", "model.text_model.embeddings.token_embedding.weight", True),
        ("model", "model.visual.conv1.weight", False),  # wrapper components are not part of the name
        ("model.embeddings", "text_tower.model.embeddings.word_embeddings.weight", True),
    ],
)
def test_patterns_match_whole_consecutive_components(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected


def test_display_names_drop_wrapper_prefixes_only() -> None:
    assert display_name("model.visual.layer4.0.conv1.weight") == "visual.layer4.0.conv1.weight"
    assert display_name("module._orig_mod.base.model.text_model.x") == "text_model.x"
    assert display_name("text_tower.model.embeddings.word_embeddings.weight") == (
        "text_tower.model.embeddings.word_embeddings.weight"
    )
    assert display_name("model.logit_scale") == "logit_scale"


def test_matcher_on_a_tiny_vit_and_synthetic_deep_names() -> None:
    model = build_model(ModelConfig(arch="cliptune-tiny-vit"))
    names = [n for n, _ in model.named_parameters()]
    hits = {n for n in names if matches("resblocks.1", n)}
    assert hits and all(".resblocks.1." in n for n in hits)
    deep = [f"model.visual.transformer.resblocks.{i}.ln_1.weight" for i in range(12)]
    assert [n for n in deep if matches("resblocks.1", n)] == [deep[1]]
    assert [n for n in deep if matches("resblocks.11", n)] == [deep[11]]


def test_pattern_lists_parse_in_order() -> None:
    parsed = parse_patterns(" !attnpool , layer4,, !model.visual.layer4.0 ,", "finetune.lock_image_patterns")
    assert [(p.text, p.parts, p.lock) for p in parsed] == [
        ("!attnpool", ("attnpool",), False),
        ("layer4", ("layer4",), True),
        ("!model.visual.layer4.0", ("visual", "layer4", "0"), False),
    ]
    assert parse_patterns("", "k") == []


@pytest.mark.parametrize("bad", ["!", "layer4..0", ".layer4", "layer 4"])
def test_malformed_patterns_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"finetune\.lock_text_patterns.*malformed"):
        parse_patterns(f"attnpool,{bad}", "finetune.lock_text_patterns")


def test_trainable_groups_are_the_fewest_covering_prefixes() -> None:
    flags = {
        "visual.conv1.weight": False,
        "visual.layer3.0.conv1.weight": False,
        "visual.layer4.0.conv1.weight": True,
        "visual.layer4.0.bn1.weight": True,
        "visual.attnpool.q_proj.weight": True,
        "visual.attnpool.positional_embedding": False,
    }
    assert trainable_groups(flags) == ["visual.layer4", "visual.attnpool.q_proj"]


# ---------------------------------------------------------------------------------------------------------------
# Trainable sets on every backend


@pytest.fixture(scope="module")
def models(backends) -> dict[str, ClipModel]:
    torch.manual_seed(0)
    return {name: build_model(backends[name]) for name in BACKENDS}


@pytest.mark.parametrize("name", BACKENDS)
def test_whole_tower_flags(models, name: str) -> None:
    model = unlock_all(models[name])
    everything = {n for n, _ in model.named_parameters()}
    assert apply_locking(model, FinetuneConfig()) == []
    assert trainable(model) == everything
    assert apply_locking(model, FinetuneConfig(lock_image=True)) == ["image"]
    assert trainable(model) == everything - names_of(model, "image")
    unlock_all(model)
    assert apply_locking(model, FinetuneConfig(lock_image=True, lock_text=True)) == ["image", "text"]
    assert trainable(model) == names_of(model, "shared")


@pytest.mark.parametrize("name", BACKENDS)
def test_unlock_part_of_a_locked_image_tower(models, name: str) -> None:
    model = unlock_all(models[name])
    part = IMAGE_PART[name]
    cfg = FinetuneConfig(lock_image=True, lock_image_patterns=f"!{part}")
    assert apply_locking(model, cfg) == []  # partially locked: not run under no_grad, not cached
    image = names_of(model, "image")
    expected_image = {n for n in image if _contains(n, part)}
    assert expected_image and expected_image != image
    assert trainable(model) & image == expected_image
    assert trainable(model) - image == {n for n, _ in model.named_parameters()} - image


@pytest.mark.parametrize("name", BACKENDS)
def test_lock_token_embeddings_of_a_trainable_text_tower(models, name: str) -> None:
    model = unlock_all(models[name])
    part = TOKEN_EMBEDDING[name]
    assert apply_locking(model, FinetuneConfig(lock_text_patterns=part)) == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == 1 and _contains(next(iter(frozen)), part)
    assert model.tower_of(next(iter(frozen))) == "text"


def test_later_patterns_override_earlier_ones(models) -> None:
    model = unlock_all(models["openclip-rn"])
    apply_locking(model, FinetuneConfig(lock_image=True, lock_image_patterns="!layer4,layer4.0.bn1"))
    image_trainable = trainable(model) & names_of(model, "image")
    assert image_trainable == {n for n in names_of(model, "image") if ".layer4." in n and ".layer4.0.bn1." not in n}


def test_patterns_that_lock_a_whole_tower_report_it_locked(models) -> None:
    model = unlock_all(models["openclip-vit"])
    assert apply_locking(model, FinetuneConfig(lock_image_patterns="visual")) == ["image"]
    model = unlock_all(models["composed"])
    assert apply_locking(model, FinetuneConfig(lock_text_patterns="text_tower")) == ["text"]


def test_a_pattern_matching_nothing_is_an_error_that_names_key_pattern_and_examples(models) -> None:
    model = unlock_all(models["openclip-rn"])
    with pytest.raises(ConfigError) as err:
        apply_locking(model, FinetuneConfig(lock_image=True, lock_image_patterns="!attnpool,!layr4"))
    message = str(err.value)
    assert "finetune.lock_image_patterns" in message and "'!layr4'" in message
    assert "layer4" in message and "visual." in message  # a close component and example names
    assert trainable(model) == {n for n, _ in model.named_parameters()}, "a rejected config changed the model"


def test_a_pattern_for_the_other_tower_is_an_error(models) -> None:
    model = unlock_all(models["hf-clip"])
    with pytest.raises(ConfigError, match=r"lock_image_patterns.*'token_embedding'.*text tower"):
        apply_locking(model, FinetuneConfig(lock_image_patterns="token_embedding"))
    with pytest.raises(ConfigError, match=r"lock_text_patterns.*'logit_scale'.*shared"):
        apply_locking(model, FinetuneConfig(lock_text_patterns="logit_scale"))


def test_apply_locking_logs_per_tower_counts_and_groups(models, caplog) -> None:
    model = unlock_all(models["openclip-rn"])
    with caplog.at_level(logging.INFO, logger="cliptune"):
        apply_locking(model, FinetuneConfig(lock_image=True, lock_image_patterns="!attnpool"))
    text = caplog.text
    assert "'!attnpool' unlocks 9 tensor(s)" in text
    assert "image  trainable" in text and "text   trainable" in text and "%" in text
    assert "trainable: visual.attnpool" in text


# ---------------------------------------------------------------------------------------------------------------
# The seed-000 RN50 recipe, and resblocks.1 vs resblocks.10/11 on a real 12-block text tower


def test_seed_000_rn50_recipe(rn50) -> None:
    model = unlock_all(rn50)
    cfg = FinetuneConfig(
        lock_image=True,
        lock_image_patterns="!attnpool,!layer4",
        lock_text_patterns="positional_embedding,token_embedding",
    )
    assert apply_locking(model, cfg) == []
    names = {n for n, _ in model.named_parameters()}
    image_trainable = {n for n in names if n.startswith(("model.visual.attnpool.", "model.visual.layer4."))}
    text_frozen = {"model.positional_embedding", "model.token_embedding.weight"}
    assert trainable(model) == image_trainable | (names_of(model, "text") - text_frozen) | {"model.logit_scale"}
    # the attention pool's own positional embedding is image-tower: unlocked with attnpool, untouched by the text key
    assert "model.visual.attnpool.positional_embedding" in trainable(model)
    summary = trainable_summary(model)
    assert "trainable: visual.layer4, visual.attnpool" in summary
    assert "trainable: text_projection, transformer, ln_final" in summary


def test_resblocks_1_never_hits_resblocks_10_or_11(rn50) -> None:
    model = unlock_all(rn50)
    blocks = {n for n in names_of(model, "text") if ".resblocks." in n}
    assert {n.split(".")[3] for n in blocks} == {str(i) for i in range(12)}
    apply_locking(model, FinetuneConfig(lock_text_patterns="resblocks.1"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in blocks if n.startswith("model.transformer.resblocks.1.")}
    assert len(frozen) == 12  # ln_1, attn in/out, ln_2, c_fc, c_proj: weight and bias each


# ---------------------------------------------------------------------------------------------------------------
# Train mode: locked towers in eval, BatchNorm statistics frozen in a partially locked tower


def test_batchnorm_statistics_frozen_only_in_the_locked_part(backends) -> None:
    torch.manual_seed(0)
    model = build_model(backends["openclip-rn"])
    locked = apply_locking(model, FinetuneConfig(lock_image=True, lock_image_patterns="!layer4,!attnpool"))
    visual = model.model.visual
    set_train_mode(model, locked)
    bns = ["bn1", "layer1.0.bn1", "layer3.0.downsample.1", "layer4.0.bn1", "layer4.0.downsample.1"]
    frozen_bns, moving_bns = [visual.get_submodule(n) for n in bns[:3]], [visual.get_submodule(n) for n in bns[3:]]
    assert not any(bn.training for bn in frozen_bns) and all(bn.training for bn in moving_bns)
    assert visual.layer1.training and model.model.transformer.training  # only BatchNorm modules change mode
    before = {id(bn): bn.running_mean.clone() for bn in frozen_bns + moving_bns}
    model.encode_image(torch.randn(4, 3, 64, 64))
    for bn in frozen_bns:
        assert torch.equal(bn.running_mean, before[id(bn)])
    for bn in moving_bns:
        assert not torch.equal(bn.running_mean, before[id(bn)])


def test_fully_locked_towers_stay_in_eval_mode(backends) -> None:
    model = build_model(backends["openclip-rn"])
    locked = apply_locking(model, FinetuneConfig(lock_image=True))
    set_train_mode(model, locked)
    assert not any(m.training for m in model.model.visual.modules())
    assert model.model.transformer.training and model.training
