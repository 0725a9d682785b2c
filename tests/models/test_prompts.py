"""Prompt tuning: n learnable vectors after the text start token, pooled at the shifted end token, on every backend."""

import copy
import dataclasses
import json

import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from cliptune.config import ModelConfig
from cliptune.losses import clip_loss
from cliptune.models import ModelError, build_model, load_model, save_model
from cliptune.models.prompted import PromptedModel, add_prompts

N = 3
CUSTOM_ARCH = "cliptune-test-custom-text"  # open_clip CustomTextCLIP: its TextTransformer lives on `model.text`
NAMES = ["openclip-vit", "openclip-rn", "openclip-custom", "hf-clip", "hf-siglip", "composed"]
# openclip-rn differs from openclip-vit only in its image tower: tests of the text path alone skip it, for time.
TEXT_NAMES = [name for name in NAMES if name != "openclip-rn"]
SHORT = "a dog"
LONG = " ".join(["a big red dog on the green grass"] * 20)  # longer than every tower
CAPTIONS = ["a red dog", "a big blue dog on the grass", "a dog", "a small green cat in the sun"]


@pytest.fixture(scope="module")
def built(backends, tmp_path_factory):
    """name -> tiny random base model, shared: tests that change weights wrap a deep copy."""
    folder = tmp_path_factory.mktemp("custom-text-config")
    text = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    config = {"embed_dim": 16, "custom_text": True, "vision_cfg": vision, "text_cfg": text}
    (folder / f"{CUSTOM_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    cls_tower = dataclasses.replace(backends["composed"].text_tower, pooling="cls")
    torch.manual_seed(0)
    models = {name: build_model(cfg).eval() for name, cfg in backends.items()}
    models["openclip-custom"] = build_model(ModelConfig(arch=CUSTOM_ARCH)).eval()
    models["composed-cls"] = build_model(dataclasses.replace(backends["composed"], text_tower=cls_tower)).eval()
    yield models
    open_clip.factory._MODEL_CONFIGS.pop(CUSTOM_ARCH, None)  # leave open_clip's registry as it was


def prompted(built, name: str, n: int = N, copied: bool = False) -> PromptedModel:
    """Prompts on the shared base (wrapping changes nothing in it), or on a copy for tests that change weights."""
    torch.manual_seed(1)
    return add_prompts(copy.deepcopy(built[name]) if copied else built[name], n).eval()


def images_for(model) -> torch.Tensor:
    colours = ["red", "blue", "green", "white"]
    return torch.stack([model.eval_transform(Image.new("RGB", (48, 48), c)) for c in colours])


def end_id(base) -> int:
    """The end-of-text token id of each backend's tokenizer."""
    ends = {
        "openclip": lambda: base._tokenizer.eot_token_id,
        "hf": lambda: base.tokenizer.eos_token_id,
        "composed": lambda: base.text_tower.tokenizer.sep_token_id,
    }
    return ends[base.backend]()


def with_prompt_as_words(base, prompt: torch.Tensor):
    """A copy of `base` whose vocabulary has the n prompt vectors as n new words (ids V..V+n-1), and that pools at
    the first end token: running it on ids with those words after the start token IS prompt tuning, done entirely
    by the base's own code."""
    other = copy.deepcopy(base)
    if base.backend == "openclip":
        tower = other.model.text if hasattr(other.model, "text") else other.model
        owner, attr = tower, "token_embedding"
        # The new ids are the largest, so argmax pooling would land on them: pool the first <end_of_text>.
        if tower is other.model:
            other.model.text_pool_type, other.model.text_eos_id = "eos", base._tokenizer.eot_token_id
        else:
            tower.pool_type, tower.eos_id = "eos", base._tokenizer.eot_token_id
    elif base.backend == "hf":
        owner, attr = other.model.text_model.embeddings, "token_embedding"
    else:
        owner, attr = other.text_tower.model.embeddings, "word_embeddings"
    old = getattr(owner, attr)
    new = nn.Embedding(old.num_embeddings + prompt.shape[0], old.embedding_dim)
    new.weight.data = torch.cat([old.weight.data, prompt.detach()])
    setattr(owner, attr, new)
    return other, old.num_embeddings


def insert_ids(tokens: torch.Tensor, first_new: int, n: int, at: int) -> torch.Tensor:
    new = torch.arange(first_new, first_new + n).expand(tokens.shape[0], n)
    return torch.cat([tokens[:, :at], new, tokens[:, at:]], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Where the prompts go and where the text feature is pooled


@pytest.mark.parametrize("name", ["openclip-vit", "openclip-rn"])
def test_openclip_pools_at_the_shifted_end_token(built, name):
    """Hand computation with the base's own pieces: prompts after SOT, positions after insertion, causal mask,
    pooling at EOT + n. Pooling at the unshifted EOT (ITRA's bug) reads the caption's last word instead."""
    model = prompted(built, name)
    m = model.base.model
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        x = m.token_embedding(tokens)
        x = torch.cat([x[:, :1], model.prompt.expand(len(CAPTIONS), -1, -1), x[:, 1:]], dim=1)
        x = m.ln_final(m.transformer(x + m.positional_embedding, attn_mask=m.attn_mask))
        rows, eot = torch.arange(len(CAPTIONS)), tokens.argmax(dim=-1)
        shifted, unshifted = x[rows, eot + N] @ m.text_projection, x[rows, eot] @ m.text_projection
        got = model.encode_text(tokens, normalize=False)
    assert x.shape[1] == m.context_length == 77
    torch.testing.assert_close(got, shifted, atol=1e-5, rtol=1e-5)
    assert (got - unshifted).abs().max() > 1e-2


def test_hf_clip_pools_at_the_shifted_end_token(built):
    """transformers' own CLIP text model on ids where the prompts are n new words: its state at EOS + n is the
    prompted embedding; its state at the unshifted EOS is not."""
    model = prompted(built, "hf-clip")
    tokens = model.tokenize(CAPTIONS)
    other, first_new = with_prompt_as_words(model.base, model.prompt)
    ids = insert_ids(tokens, first_new, N, at=1)
    with torch.no_grad():
        hidden = other.model.text_model(input_ids=ids).last_hidden_state  # causal, full length, no padding mask
        rows, eos = torch.arange(len(CAPTIONS)), model.base.eos_positions(tokens)
        shifted = other.model.text_projection(hidden[rows, eos + N])
        unshifted = other.model.text_projection(hidden[rows, eos])
        got = model.encode_text(tokens, normalize=False)
    assert model.path.at == 1 and ids.shape[1] == model.base.context_length
    torch.testing.assert_close(got, shifted, atol=1e-5, rtol=1e-5)
    assert (got - unshifted).abs().max() > 1e-2


@pytest.mark.parametrize("name", [*NAMES, "composed-cls"])
def test_prompts_equal_new_words_after_the_start_token(built, name):
    """Every backend: the prompted embedding equals the base's own encode_text on ids with the prompts as new
    vocabulary words inserted after the start token (at 0 for SigLIP, which has none). This pins the insertion
    point, the positions, the masks (composed: the prompts are attended and counted in the mean) and the pooling."""
    model = prompted(built, name)
    tokens = model.tokenize(CAPTIONS)
    other, first_new = with_prompt_as_words(model.base, model.prompt)
    with torch.no_grad():
        expected = other.encode_text(insert_ids(tokens, first_new, N, model.path.at))
        got = model.encode_text(tokens)
        plain = model.base.encode_text(model.base.tokenize(CAPTIONS))
    assert model.path.at == (0 if name == "hf-siglip" else 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the prompts do change the embedding
    # The text path run piece by piece with no prompt vectors is the base's own text tower.
    full = model.base.tokenize(CAPTIONS)
    with torch.no_grad():
        empty = model.path.features(model.base, full, model.prompt[:0])
        torch.testing.assert_close(empty, model.base.encode_text(full, normalize=False), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Tokens


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_tokens_leave_room_for_the_prompts_keep_the_end_token_and_batch_alike(built, name):
    model = prompted(built, name)
    length = model.context_length - N
    tokens = model.tokenize([SHORT, LONG])
    end = end_id(model.base)
    assert tokens.shape == (2, length) and tokens.dtype == torch.long
    assert tokens[1, -1] == end and not (tokens[1, :-1] == end).any()  # truncated, the end token kept
    assert (tokens[0] == end).any()
    assert model.tokenize([]).shape == (0, length)
    with torch.no_grad():  # prompts + the truncated caption fill the tower exactly
        alone, batch = model.encode_text(tokens[:1]), model.encode_text(tokens)
    # A caption embeds the same alone and beside a longer one.
    torch.testing.assert_close(alone[0], batch[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="tokenize"):
        model.encode_text(model.base.tokenize([SHORT]))  # the base's full-length tokens leave no room


# ---------------------------------------------------------------------------------------------------------------
# Training and saving


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_with_the_towers_locked_only_the_prompt_and_temperature_train(built, name):
    model = prompted(built, name, copied=True)
    assert model.tower_of("prompt") == "text" and "prompt" in model.tower_parameters("text")
    for pname, param in model.named_parameters():
        param.requires_grad_(pname == "prompt" or param is model.logit_scale)
    scale_name = next(k for k, p in model.named_parameters() if p is model.logit_scale)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():  # a locked image tower: its features once, as the trainer caches them
        image_features = model.encode_image(images_for(model))
    tokens = model.tokenize(CAPTIONS)
    for step in range(3):
        optimizer.zero_grad()
        loss = clip_loss(image_features, model.encode_text(tokens), model.logit_scale)
        loss.backward()
        if step == 0:
            with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
            assert with_grad == {"prompt", scale_name}
            assert model.prompt.grad.abs().sum() > 0
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "prompt" in changed and changed <= {"prompt", scale_name}


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_save_and_load_give_identical_embeddings(built, name, tmp_path):
    model = prompted(built, name)
    folder = save_model(model, tmp_path / name)
    loaded = load_model(folder)
    assert isinstance(loaded, PromptedModel) and loaded.n == N
    assert loaded.spec() == model.spec() == {"backend": "prompted", "n": N, "base": model.base.spec()}
    tokens = model.tokenize(CAPTIONS)
    assert torch.equal(loaded.tokenize(CAPTIONS), tokens)
    with torch.no_grad():
        assert torch.equal(loaded.prompt, model.prompt)
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=0, rtol=0)
        images = images_for(model)
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The interface around the prompts, and what is refused


def test_everything_but_the_text_path_delegates_to_the_base(built):
    base = built["composed"]
    assert not add_prompts(base, N).training  # wrapping an eval-mode model gives an eval-mode model
    model = prompted(built, "composed")
    assert model.logit_scale is base.logit_scale and model.eval_transform is base.eval_transform
    assert model.prompt.shape == (N, base.text_tower.width)
    assert 0.01 < model.prompt.std().item() < 0.04  # N(0, 0.02)
    for pname, _ in base.named_parameters():
        assert model.tower_of(f"base.{pname}") == base.tower_of(pname)
    assert model.tower_modules("text") == base.tower_modules("text")
    assert model.image_head(model.image_trunk(images_for(model))).shape[-1] == base.layout.embed_dim


@pytest.mark.parametrize("n", [0, -1, True, 76, 100])
def test_prompt_counts_without_room_are_refused(built, n):
    with pytest.raises(ModelError, match="prompt_tokens"):
        add_prompts(built["openclip-vit"], n)
    assert issubclass(ModelError, ValueError)


def test_what_cannot_be_prompted_is_refused(built):
    model = prompted(built, "openclip-vit")
    with pytest.raises(ModelError, match="prompts first"):
        add_prompts(model, 2)  # wrappers go on top of the prompts, not under them
    base = copy.deepcopy(built["openclip-vit"])
    base.model.text_pool_type = "none"
    with pytest.raises(ModelError, match="'none'"):
        add_prompts(base, 2)
    with pytest.raises(ModelError, match=r"finetune\.prompt_tokens"):
        build_model(ModelConfig(backend="prompted"))
