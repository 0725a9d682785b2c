"""LoRA on every backend: unchanged at init, only adapters train, merge/export, adapter-only state, errors."""

import copy
import logging

import pytest
import torch
from PIL import Image
from torch import nn

from cliptune.config import LoraConfig
from cliptune.losses import clip_loss
from cliptune.models import build_model, load_model, save_model
from cliptune.tuning.lora import (
    LoraDelta,
    LoraMultiheadAttention,
    WeightLora,
    apply_lora,
    has_lora,
    load_lora_state_dict,
    lora_state_dict,
    matches,
    merge_lora,
    scale_lora,
)
from tests.helpers import HF_CAPTIONS

BACKENDS = ["openclip-vit", "openclip-rn", "hf-clip", "hf-siglip", "composed"]
# `finetune.lora.targets`' default before each backend answered for its own (`ClipModel.lora_targets`): every
# attention and MLP projection on every backend, HF CLIP/SigLIP's `self_attn` and the attention pooling of
# OpenCLIP's ResNet included (whole components: `attn` matches neither).
TARGETS = ["attn", "mlp", "attention", "self_attn", "attnpool", "intermediate", "output.dense"]
# Towers that get adapters with TARGETS: the composed model's timm ResNet has no Linear or attention layer.
ADAPTED = {name: {"image", "text"} for name in BACKENDS} | {"composed": {"text"}}


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"rank": 4, "alpha": 8.0, "targets": TARGETS, **kw})


@pytest.fixture(scope="module")
def make(backends):
    """name -> a fresh copy of that backend's tiny model (each is built once per module)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_model(backends[name]).eval()
        return copy.deepcopy(cache[name])

    return get


def batch(model, n=4):
    shape = model.eval_transform(Image.new("RGB", (48, 48))).shape
    images = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    return images, model.tokenize(HF_CAPTIONS[:n])


def embed(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def is_adapter(name):
    return any(part.startswith("lora_") for part in name.split("."))


def randomise_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if "lora_B" in name else 0.5))


def close(a, b, atol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("name", BACKENDS)
def test_injection_keeps_outputs_and_freezes_only_adapted_towers(make, name):
    model = make(name)
    fresh = make(name)
    before = embed(model, *batch(model))
    adapted = apply_lora(model, lora())
    assert adapted and has_lora(model)
    # B starts at zero: the same embeddings (freezing alone moves OpenCLIP's text tower by ~2e-7: torch's
    # attention takes another kernel path once no weight requires grad)
    close(embed(model, *batch(model)), before, atol=1e-6)

    params = dict(model.named_parameters())
    adapters = {n for n in params if is_adapter(n)}
    assert adapters and all(params[n].requires_grad for n in adapters)
    assert {model.tower_of(n) for n in adapters} == ADAPTED[name]
    for module in adapted:  # every adapter lives under its module's name, so tower_of sees its tower
        base_name = next(n for n, _ in fresh.get_submodule(module).named_parameters())
        under = [n for n in adapters if n.startswith(f"{module}.")]
        assert under and {model.tower_of(n) for n in under} == {fresh.tower_of(f"{module}.{base_name}")}
    for n, p in params.items():
        if n not in adapters:
            assert p.requires_grad == (model.tower_of(n) not in ADAPTED[name]), n
    assert model.logit_scale.requires_grad


@pytest.mark.parametrize("name", BACKENDS)
def test_training_changes_only_adapters_and_temperature(make, name):
    model = make(name)
    apply_lora(model, lora())
    images, tokens = batch(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(3):  # B moves at step 1, A from step 2 on (its gradient is zero while B is)
        loss = clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale)
        optim.zero_grad()
        loss.backward()
        optim.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    adapters = {n for n in start if is_adapter(n)}
    assert adapters <= changed, f"adapters without effect: {sorted(adapters - changed)[:4]}"
    assert not {n for n in changed - adapters if model.tower_of(n) in ADAPTED[name]}
    assert any(model.tower_of(n) == "shared" for n in changed)  # logit_scale


@pytest.mark.parametrize("name", BACKENDS)
def test_merge_equals_unmerged_restores_keys_and_exports(make, name, tmp_path):
    model = make(name)
    keys = list(model.state_dict())
    inputs = batch(model)
    base = embed(model, *inputs)
    apply_lora(model, lora())
    randomise_adapters(model)
    unmerged = embed(model, *inputs)
    assert not torch.allclose(unmerged[1], base[1], atol=1e-4)  # the adapters do something
    assert merge_lora(model) is model
    assert not has_lora(model)
    assert list(model.state_dict()) == keys
    merged = embed(model, *inputs)
    close(merged, unmerged, atol=1e-5)
    loaded = load_model(save_model(model, tmp_path / "merged"))
    close(embed(loaded, *inputs), merged, atol=1e-6)


def test_openclip_attention_adapters_cover_q_k_v_and_out_proj(make):
    model = make("openclip-vit")
    originals = {id(m.in_proj_weight) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    adapted = apply_lora(model, lora(targets=["attn"]))
    attns = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attns) == len(adapted) == 4  # 2 blocks per tower
    images, tokens = batch(model)
    for step in range(2):  # with B = 0 only B gets a gradient; with B != 0, A too
        model.zero_grad()
        clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale).backward()
        for attn in attns:
            assert isinstance(attn, LoraMultiheadAttention)
            qkv, out = attn.lora_weights["in_proj_weight"], attn.out_proj.lora_weights["weight"]
            assert isinstance(qkv, LoraDelta) and qkv.lora_B.shape == (3, attn.embed_dim, 4)
            for factor in ("lora_B", "lora_A") if step else ("lora_B",):
                per_projection = getattr(qkv, factor).grad.flatten(1).abs().sum(1)
                assert (per_projection > 0).all(), f"q/k/v {factor} gradients {per_projection}"
                assert getattr(out, factor).grad.abs().sum() > 0
        randomise_adapters(model)
    # the frozen originals stay the same Parameter objects, under their own names: nothing is re-registered
    bases = [attn._parameters["in_proj_weight"] for attn in attns]
    assert {id(p) for p in bases} == originals and not any(p.requires_grad for p in bases)


def test_resnet_attnpool_is_adapted_in_weight_space(make):
    model = make("openclip-rn")
    adapted = apply_lora(model, lora(targets=["attnpool"], towers=["image"]))
    assert sorted(n.rsplit(".", 1)[1] for n in adapted) == ["c_proj", "k_proj", "q_proj", "v_proj"]
    images, _ = batch(model)
    before = embed(model, images, model.tokenize(["x"]))[0]
    with torch.no_grad():
        model.model.visual.attnpool.q_proj.lora_weights["weight"].lora_B.fill_(0.05)
    # attnpool reads q_proj.weight instead of calling q_proj: the adapter must still act
    assert not torch.allclose(embed(model, images, model.tokenize(["x"]))[0], before)


@pytest.mark.parametrize("name", ["openclip-vit", "hf-siglip"])
def test_adapter_only_state_dict_round_trip(make, name):
    trained = make(name)
    apply_lora(trained, lora())
    randomise_adapters(trained)
    inputs = batch(trained)
    state = lora_state_dict(trained)
    assert state and all(is_adapter(k) for k in state)
    assert {trained.tower_of(k) for k in state} == {"image", "text"}

    fresh = make(name)
    apply_lora(fresh, lora())
    load_lora_state_dict(fresh, state)
    close(embed(fresh, *inputs), embed(trained, *inputs), atol=0)
    scale_lora(trained, 0.0)  # the state holds copies
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())

    # resume: a full checkpoint of an adapted model loads into a fresh model adapted with the same config
    resumed = make(name)
    apply_lora(resumed, lora())
    resumed.load_state_dict(fresh.state_dict())
    close(embed(resumed, *inputs), embed(fresh, *inputs), atol=0)

    other = make(name)
    apply_lora(other, lora(towers=["text"]))
    with pytest.raises(ValueError, match=r"missing|unexpected"):
        load_lora_state_dict(other, state)
    other = make(name)
    apply_lora(other, lora(rank=2))
    with pytest.raises(ValueError, match="rank"):
        load_lora_state_dict(other, state)


def test_scale_lora_is_wise_ft_on_the_merged_weights(make):
    model = make("openclip-vit")
    zero_shot = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, lora())
    randomise_adapters(model)
    scaled = copy.deepcopy(model)
    fine_tuned = merge_lora(model).state_dict()
    assert has_lora(scaled)  # merging one copy leaves the other intact
    scale_lora(scaled, 0.3)
    wise = merge_lora(scaled).state_dict()
    for k, theta0 in zero_shot.items():
        torch.testing.assert_close(wise[k], theta0 + 0.3 * (fine_tuned[k] - theta0), atol=1e-6, rtol=0)


def test_no_match_names_the_key_and_lists_modules(make):
    model = make("openclip-vit")
    with pytest.raises(ValueError, match=r"finetune\.lora\.targets.*resblocks\.0\.attn"):
        apply_lora(model, lora(targets=["attention_pool", "resblocks.7"]))
    assert not has_lora(model)
    assert all(p.requires_grad for p in model.parameters())


def test_targets_in_one_tower_leave_the_other_as_it_is(make, caplog):
    model = make("openclip-rn")  # attn, mlp match nothing in a ResNet image tower (attnpool is not attn)
    model.logit_scale.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="cliptune.tuning.lora"):
        adapted = apply_lora(model, lora(targets=["attn", "mlp"]))
    assert adapted and all(model.tower_of(f"{n}.in_proj_weight") == "text" for n in adapted if n.endswith("attn"))
    assert "image tower" in caplog.text
    assert all(p.requires_grad for p in model.tower_parameters("image").values())
    assert not model.logit_scale.requires_grad  # kept as it was

    model = make("hf-clip")
    adapted = apply_lora(model, lora(towers=["text"]))
    assert adapted and all(n.startswith("model.text_model.") for n in adapted)
    assert all(p.requires_grad for p in model.tower_parameters("image").values())


@pytest.mark.parametrize("name", BACKENDS)
def test_each_backend_default_targets_adapt_what_the_former_default_list_did(make, name):
    before = apply_lora(make(name), lora())  # the fixed list above
    assert before and apply_lora(make(name), lora(targets=[])) == before
    # a wrapper answers with its base model's targets
    assert apply_lora(with_heads(make(name)), lora(targets=[])) == apply_lora(with_heads(make(name)), lora())


def with_heads(model):
    from cliptune.models.heads import HeadedModel

    return HeadedModel(model, "mlp")


def test_patterns_match_whole_dotted_components(make):
    assert matches("model.transformer.resblocks.3.attn", "attn")
    assert matches("model.transformer.resblocks.3.attn.out_proj", "resblocks.3.attn")
    assert not matches("model.transformer.resblocks.13.attn", "resblocks.3")
    assert not matches("model.visual.attnpool.q_proj", "attn")
    assert not matches("text_model.encoder.layers.0.self_attn.q_proj", "attn")
    model = make("openclip-vit")
    adapted = apply_lora(model, lora(targets=["resblocks.1.mlp"]))
    assert adapted == [
        "model.transformer.resblocks.1.mlp.c_fc",
        "model.transformer.resblocks.1.mlp.c_proj",
        "model.visual.transformer.resblocks.1.mlp.c_fc",
        "model.visual.transformer.resblocks.1.mlp.c_proj",
    ]
    # targeting only an MHA's out_proj (never called as a module) still adapts it, in weight space
    model = make("openclip-vit")
    assert apply_lora(model, lora(targets=["out_proj"], towers=["image"]))
    attn = model.model.visual.transformer.resblocks[0].attn
    assert isinstance(attn.out_proj, WeightLora) and not isinstance(attn, WeightLora)


def test_off_twice_and_bad_config(make, caplog):
    model = make("openclip-vit")
    assert apply_lora(model, LoraConfig(rank=0)) == [] and not has_lora(model)
    with pytest.raises(ValueError, match="towers"):
        apply_lora(model, lora(towers=["shared"]))
    with caplog.at_level(logging.WARNING, logger="cliptune.tuning.lora"):
        apply_lora(model, lora(dropout=0.5))
    assert "dropout" in caplog.text  # not applicable to the weight-space (MHA) adapters
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, lora())
    # dropout acts on the Linear adapters' input in training mode only
    randomise_adapters(model)
    inputs = batch(model)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.encode_text(inputs[1]), model.encode_text(inputs[1]))
    model.eval()
    close(embed(model, *inputs), embed(model, *inputs), atol=0)
