"""Dense token features (`encode_image_tokens`, `encode_text_tokens`) of the OpenCLIP ViT and HF CLIP backends.

References are computed independently of the code under test: a forward hook captures the last transformer
block's output during the library's own forward (untrimmed), and the final norm and projection are applied here
by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cliptune.config import ModelConfig
from cliptune.models import ClipModel, build_model
from cliptune.models.heads import add_heads
from cliptune.models.hf import HFClipModel
from cliptune.models.openclip import OpenClipModel
from cliptune.models.prompted import add_prompts
from tests.helpers import save_tiny_clip, save_tiny_siglip, tiny_config

CAPTIONS = ["a dog", "a small red car on the green grass", "cat"]
LONG = "a very long caption " * 30  # beyond the 77-token context: truncated, the end token takes the last slot
CONTEXT = 77
BACKENDS = pytest.mark.parametrize("name", ["openclip", "hf"])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ClipModel]:
    torch.manual_seed(0)
    vit = build_model(ModelConfig(arch="cliptune-tiny-vit")).eval()
    clip_dir = save_tiny_clip(tmp_path_factory.mktemp("clip"))
    return {"openclip": vit, "hf": build_model(ModelConfig(backend="hf", arch=str(clip_dir))).eval()}


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@contextmanager
def captured(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The output of every call of `module` inside the block."""
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, out: torch.Tensor | tuple) -> None:
        outputs.append(out[0] if isinstance(out, tuple) else out)  # transformers 4.x layers return tuples

    handle = module.register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


def last_block(model: ClipModel, tower: str) -> nn.Module:
    if isinstance(model, HFClipModel):
        owner = model.model.vision_model if tower == "image" else model.model.text_model
        return owner.encoder.layers[-1]
    owner = model.model.visual if tower == "image" else model.model
    return owner.transformer.resblocks[-1]


def reference_patches(model: ClipModel, images: torch.Tensor) -> torch.Tensor:
    with captured(last_block(model, "image")) as out:
        model.encode_image(images)
    patches = out[0][:, 1:]  # the class token comes first
    if isinstance(model, HFClipModel):
        return model.model.visual_projection(model.model.vision_model.post_layernorm(patches))
    return model.model.visual.ln_post(patches) @ model.model.visual.proj


def reference_text(model: ClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """Projected final-norm states at every position of the whole context, from the library's own forward."""
    with captured(last_block(model, "text")) as out:
        if isinstance(model, HFClipModel):
            model.model.text_model(input_ids=tokens)  # causal: no state up to a caption's end sees the padding
        else:
            model.model.encode_text(tokens)  # open_clip's forward, untrimmed
    if isinstance(model, HFClipModel):
        return model.model.text_projection(model.model.text_model.final_layer_norm(out[0]))
    return model.model.ln_final(out[0]) @ model.model.text_projection


def end_id(model: ClipModel) -> int:
    return model.tokenizer.eos_token_id if isinstance(model, HFClipModel) else model._tokenizer.eot_token_id


def first_end(model: ClipModel, tokens: torch.Tensor) -> torch.Tensor:
    return (tokens == end_id(model)).int().argmax(dim=-1)


def content_tokens(model: ClipModel, caption: str) -> int:
    """How many tokens the tokenizer makes of the caption's words (no start or end token)."""
    if isinstance(model, HFClipModel):
        return len(model.tokenizer(caption)["input_ids"]) - 2
    return len(model._tokenizer.encode(caption))


@BACKENDS
def test_image_tokens_are_the_post_normed_projected_patches(models: dict[str, ClipModel], name: str) -> None:
    model, images = models[name], _images()
    with torch.no_grad():
        pooled, patches = model.encode_image_tokens(images)
        torch.testing.assert_close(pooled, model.encode_image(images))
        assert patches.shape == (3, (32 // 8) ** 2, pooled.shape[1])  # one per patch of the 4 x 4 grid
        torch.testing.assert_close(patches, reference_patches(model, images))


def test_openclip_patches_get_the_norm_that_follows_pooling(models: dict[str, ClipModel], monkeypatch) -> None:
    # With final_ln_after_pool, open_clip norms the pooled feature only and hands back un-normed tokens.
    model, images = models["openclip"], _images()
    monkeypatch.setattr(model.model.visual, "pool_type", "avg")
    monkeypatch.setattr(model.model.visual, "final_ln_after_pool", True)
    with torch.no_grad():
        pooled, patches = model.encode_image_tokens(images)
        torch.testing.assert_close(pooled, model.encode_image(images))
        torch.testing.assert_close(patches, reference_patches(model, images))


@BACKENDS
def test_text_tokens_are_the_projected_final_norm_states(models: dict[str, ClipModel], name: str) -> None:
    model = models[name]
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        pooled, features, mask = model.encode_text_tokens(tokens)
        reference = reference_text(model, tokens)
        torch.testing.assert_close(pooled, model.encode_text(tokens))
    end, rows = first_end(model, tokens), torch.arange(len(CAPTIONS))
    length = int(end.max()) + 1  # trimmed to the batch's longest caption
    assert features.shape == (3, length, pooled.shape[1]) and mask.shape == (3, length)
    torch.testing.assert_close(pooled, F.normalize(reference[rows, end], dim=-1))
    up_to_end = torch.arange(length)[None, :] <= end[:, None]
    torch.testing.assert_close(features[up_to_end], reference[:, :length][up_to_end])
    # Both towers pool at the end token after the final norm and projection: its feature is the pooled one.
    torch.testing.assert_close(F.normalize(features[rows, end], dim=-1), pooled)


@BACKENDS
def test_mask_marks_content_and_end_tokens_only(models: dict[str, ClipModel], name: str) -> None:
    model = models[name]
    tokens = model.tokenize([*CAPTIONS, LONG])
    with torch.no_grad():
        _, features, mask = model.encode_text_tokens(tokens)
    assert features.shape[1] == CONTEXT and mask.dtype == torch.bool  # the long caption fills the context
    expected = [content_tokens(model, c) + 1 for c in CAPTIONS] + [CONTEXT - 1]  # + end; LONG: all but start
    assert mask.sum(dim=1).tolist() == expected
    assert not mask[:, 0].any()  # the start token
    last = CONTEXT - 1 - mask.flip(1).int().argmax(dim=1)
    assert (tokens[torch.arange(4), last] == end_id(model)).all()  # the last marked token is the end token
    assert mask.sum(dim=1).tolist() == last.tolist()  # and every position from 1 to it is marked


@BACKENDS
def test_trimming_to_the_longest_caption_changes_nothing(models: dict[str, ClipModel], name: str) -> None:
    model = models[name]
    with torch.no_grad():
        alone = model.encode_text_tokens(model.tokenize(["a dog"]))
        batch = model.encode_text_tokens(model.tokenize(["a dog", LONG]))
    n = alone[1].shape[1]
    assert n == 4 and batch[1].shape[1] == CONTEXT  # start, a, dog, end
    torch.testing.assert_close(alone[0][0], batch[0][0])
    torch.testing.assert_close(alone[1][0], batch[1][0, :n])
    assert torch.equal(alone[2][0], batch[2][0, :n]) and not batch[2][0, n:].any()


@BACKENDS
def test_gradients_reach_the_towers_through_the_tokens(models: dict[str, ClipModel], name: str) -> None:
    model = models[name]
    model.zero_grad(set_to_none=True)
    with captured(last_block(model, "image")) as image_calls, captured(last_block(model, "text")) as text_calls:
        _, patches = model.encode_image_tokens(_images())
        tokens = model.tokenize(CAPTIONS)
        _, features, mask = model.encode_text_tokens(tokens)
    assert len(image_calls) == len(text_calls) == 1  # pooled and tokens come from one forward pass
    (patches.square().sum() + features[mask].square().sum()).backward()  # the pooled outputs take no part
    if isinstance(model, HFClipModel):
        stem = model.model.vision_model.embeddings.patch_embedding.weight
        embedding = model.model.text_model.embeddings.token_embedding.weight
    else:
        stem, embedding = model.model.visual.conv1.weight, model.model.token_embedding.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert embedding.grad is not None and embedding.grad[tokens[:, 1]].abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_custom_text_tower_matches_open_clips_output_tokens() -> None:
    # CustomTextCLIP keeps its text tower as a TextTransformer, whose own output_tokens gives the reference.
    torch.manual_seed(0)
    arch = "cliptune-tiny-vit"
    model = OpenClipModel(arch, open_clip.CustomTextCLIP(**open_clip.get_model_config(arch)), None, None).eval()
    tokens, text = model.tokenize(CAPTIONS), model.model.text
    with torch.no_grad():
        pooled, features, mask = model.encode_text_tokens(tokens)
        text.output_tokens = True
        try:
            reference_pooled, reference_tokens = text(tokens)
        finally:
            text.output_tokens = False
        torch.testing.assert_close(pooled, model.encode_text(tokens))
    torch.testing.assert_close(pooled, F.normalize(reference_pooled, dim=-1))
    reference = (reference_tokens @ text.text_projection)[:, : features.shape[1]]
    torch.testing.assert_close(features[mask], reference[mask])


def test_models_without_dense_tokens_say_what_to_do(
    models: dict[str, ClipModel], bert_dir: Path, tmp_path: Path
) -> None:
    vit = models["openclip"]
    tokens = vit.tokenize(CAPTIONS)
    siglip = build_model(ModelConfig(backend="hf", arch=str(save_tiny_siglip(tmp_path / "siglip"))))
    calls = {
        "openclip": lambda: build_model(ModelConfig(arch="cliptune-tiny-rn")).encode_image_tokens(_images(size=64)),
        "composed": lambda: build_model(tiny_config(bert_dir)).encode_image_tokens(_images()),
        "heads": lambda: add_heads(vit, "linear").encode_text_tokens(tokens),
        "prompted": lambda: add_prompts(vit, 2).encode_text_tokens(tokens),
        "hf": lambda: siglip.encode_image_tokens(_images()),
    }
    for backend, call in calls.items():
        with pytest.raises(NotImplementedError, match=rf"'{backend}' backend.*loss.name 'fsc'.*loss.local_weight"):
            call()
