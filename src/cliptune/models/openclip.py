"""OpenCLIP backend: any open_clip architecture, with a pretrained tag, a local checkpoint file, or random init."""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from pickle import UnpicklingError  # to name the refusal of a weights file that is not tensors only
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import parse_model_name
from open_clip.hf_model import HFTextEncoder
from open_clip.model import resize_pos_embed
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer, text_global_pool
from timm.layers import resample_abs_pos_embed
from torch import nn

from cliptune.config import ModelConfig
from cliptune.models.base import (
    DROP_PATH_SUPPORT,
    HF_LORA_TARGETS,
    IMAGE_SIZE_SUPPORT,
    ClipModel,
    HFExport,
    OpenClipExport,
    TextOverflow,
    Tower,
    dense_tokens_unsupported,
    tracing,
    unsupported,
)
from cliptune.models.drop_path import add_drop_path
from cliptune.models.errors import ModelError
from cliptune.models.layers import Found, is_from, library_layers, rule
from cliptune.models.prompted import TextPath, insert_prompts, rows, shift_index

_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Registering our tiny architectures with open_clip keeps one code path for tiny and real models.
open_clip.add_model_config(_CONFIG_DIR)
TINY_ARCHS = sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))

# Text-tower members of open_clip's CLIP class, which keeps its text transformer flat on the model.
_FLAT_TEXT = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")
RESNET_STRIDE = 32  # ModifiedResNet's total downsampling: its attention pool is built for an image_size // 32 grid
_ATTNPOOL_POSITIONS = "visual.attnpool.positional_embedding"
HF_TEXT_ASSETS = "hf_text"  # sub-folder of a saved model: a Hugging Face text tower's config and tokenizer


class OpenClipModel(ClipModel):
    backend = "openclip"
    containers = ("model",)  # the open_clip model

    def __init__(
        self, arch: str, model: nn.Module, train_transform: Any, eval_transform: Any, tokenizer: Any = None
    ) -> None:
        super().__init__()
        self.arch = arch
        self.model = model
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self._tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer(arch)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's own `output_tokens` forward, with the patches given the pooled feature's norm and projection.

        In training, an active patch dropout leaves only the patches it kept (fewer than the grid).
        """
        visual = self._patch_tower()
        with _output_tokens(visual):
            pooled, patches = visual(images)
        if visual.final_ln_after_pool:  # open_clip then norms the pooled token only
            patches = visual.ln_post(patches)
        if visual.proj is not None:  # open_clip returns the tokens unprojected
            patches = patches @ visual.proj
        return F.normalize(pooled, dim=-1), patches

    def _patch_tower(self) -> VisionTransformer:
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            why = f"{self.arch!r} has a {type(visual).__name__} image tower, not open_clip's VisionTransformer"
            raise dense_tokens_unsupported(self.backend, why)
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            why = f"{self.arch!r} pools its image tower by attention or not at all: no per-patch output tokens"
            raise dense_tokens_unsupported(self.backend, why)
        return visual

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if not self._trims_text():
            return self.model.encode_text(tokens, normalize=normalize)
        x = self._trimmed_text_features(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def _trims_text(self) -> bool:
        m = self.model
        return getattr(m, "attn_mask", None) is not None and getattr(m, "text_pool_type", None) == "argmax"

    def _trimmed_text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's text forward over the batch's longest caption instead of the whole context.

        Under the causal mask no position attends to later ones, and pooling reads the end-of-text position (the
        highest token id, hence argmax), so dropping the padding after the longest caption changes nothing but the
        cost: captions are usually under 25 of the 77 tokens.
        """
        end = tokens.argmax(dim=-1)
        if not tracing():  # a traced graph keeps the input's length (see `tracing`)
            tokens = tokens[:, : int(end.max()) + 1]
        x = _text_states(self.model, tokens)
        return _project(x[torch.arange(x.shape[0], device=x.device), end], self.model.text_projection)

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every position's ln_final output through the text projection; the pooled feature is the end token's.

        open_clip's CLIP keeps no text module whose `output_tokens` could be switched on (its text pieces sit flat
        on the model), so the text transformer runs piece by piece here, as in `encode_text`. A causal tower runs
        over the batch's longest caption only (see `_trimmed_text_features`): L = the last end token + 1.
        """
        tower = self._token_text_tower()
        pool, eos_id = _text_pooling(self.model)
        end = _end_positions(tokens, pool, eos_id)
        if getattr(tower, "attn_mask", None) is not None:
            tokens = tokens[:, : int(end.max()) + 1]
        features = _project(_text_states(tower, tokens), tower.text_projection)
        pooled = features[torch.arange(features.shape[0], device=features.device), end]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        # Position 0 holds <start_of_text> (open_clip's tokenizer, checked in `_token_text_tower`).
        mask = (positions >= 1) & (positions <= end[:, None])
        return F.normalize(pooled, dim=-1), features, mask

    def _token_text_tower(self) -> nn.Module:
        """The module holding the text pieces (CLIP itself, or CustomTextCLIP's TextTransformer), if it has tokens."""
        tower = self.model.text if hasattr(self.model, "text") else self.model
        if hasattr(self.model, "text") and not isinstance(tower, TextTransformer):
            raise dense_tokens_unsupported(self.backend, f"{self.arch!r} has a {type(tower).__name__} text tower")
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            why = f"{self.arch!r} appends a CLS embedding or masks padding in its text tower"
            raise dense_tokens_unsupported(self.backend, why)
        if _text_pooling(self.model)[0] not in ("argmax", "eos"):
            why = f"{self.arch!r} does not pool its text at the end token, so its tokens have no end-token feature"
            raise dense_tokens_unsupported(self.backend, why)
        if not hasattr(self._tokenizer, "sot_token_id"):
            why = f"{self.arch!r} uses an HF tokenizer; the token mask needs open_clip's own (start token first)"
            raise dense_tokens_unsupported(self.backend, why)
        return tower

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts)

    def text_overflow(self, texts: list[str]) -> TextOverflow | None:
        if not hasattr(self._tokenizer, "sot_token_id"):  # open_clip's HFTokenizer: the default counts with it
            return super().text_overflow(texts)
        # open_clip's own BPE: `encode` gives a caption's ids without the start and end tokens `tokenize` adds. A
        # byte-level BPE token covers at least one byte of the cleaned text, so a caption with fewer bytes than the
        # context fits without encoding it (3x faster on short captions).
        tokenizer, room = self._tokenizer, int(self._tokenizer.context_length) - 2
        over = [
            i
            for i, text in enumerate(texts)
            if len(tokenizer.clean_fn(text).encode()) > room and len(tokenizer.encode(text)) > room
        ]
        return TextOverflow(len(over), room + 2, over[0] if over else None)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def tower_of(self, param_name: str) -> Tower:
        name = param_name.removeprefix("model.")
        if name.startswith("visual."):
            return "image"
        if name.startswith("text.") or name.split(".")[0] in _FLAT_TEXT:
            return "text"
        return "shared"

    def recognise_layers(self, module: nn.Module, tower: Tower) -> Found | None:
        """open_clip's own towers; timm and Hugging Face towers (some open_clip models have them) by default."""
        return _openclip_layers(module, tower) or library_layers(module)

    def text_path(self) -> TextPath:
        return OpenClipText(self)

    def weight_readers(self) -> tuple[type[nn.Module], ...]:
        # The ResNet's attention pooling reads its q/k/v/c_proj weights instead of calling those Linears.
        return (*super().weight_readers(), AttentionPool2d)

    def lora_targets(self) -> tuple[str, ...]:
        # open_clip's transformer blocks (`attn`, `mlp`), the ResNet's attention pooling (`attnpool`) and timm image
        # trunks share names; a Hugging Face text tower (e.g. xlm-roberta models) brings its own.
        own = ("attn", "mlp", "attnpool")
        text = getattr(self.model, "text", None)
        return (*own, *(t for t in HF_LORA_TARGETS if t not in own)) if isinstance(text, HFTextEncoder) else own

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        if tower == "image":
            return [self.model.visual]
        if tower == "text":
            if hasattr(self.model, "text"):
                return [self.model.text]
            return [m for n in _FLAT_TEXT if isinstance(m := getattr(self.model, n, None), nn.Module)]
        return []

    def set_drop_path(self, rate: float) -> int:
        """Drop path on both residual branches of every image block (after `ls_1` / `ls_2`, where timm puts it)."""
        if rate == 0 and not isinstance(self.model.visual, VisionTransformer):
            return 0  # no drop path is built in, so there is nothing to turn off
        visual = self._vit("model.drop_path", DROP_PATH_SUPPORT)
        branches = [(block.ls_1, block.ls_2) for block in visual.transformer.resblocks]
        return add_drop_path(visual, branches, rate)

    def set_image_size(self, size: int) -> None:
        """The same weights in the architecture built for `size` (open_clip's `force_image_size`), with the position
        embeddings resampled by open_clip's own `resize_pos_embed` (ViT), which its checkpoint loader applies too, or
        the ResNet attention pool's by `_resize_attention_pool`."""
        visual = self.model.visual
        if not isinstance(visual, (VisionTransformer, ModifiedResNet)):
            name = type(visual).__name__
            raise unsupported(f"model.image_size ({self.arch}, a {name} image tower)", self, IMAGE_SIZE_SUPPORT)
        if isinstance(visual, ModifiedResNet) and size % RESNET_STRIDE:
            raise ModelError(
                f"model.image_size: {size} px does not fit {self.arch!r}, an OpenCLIP ResNet: its attention pool "
                f"sees a size / {RESNET_STRIDE} grid, so the size must be a multiple of {RESNET_STRIDE} "
                f"(e.g. {max(RESNET_STRIDE, size // RESNET_STRIDE * RESNET_STRIDE)})"
            )
        preprocess = {**visual.preprocess_cfg, "size": size}
        quick_gelu = any(isinstance(m, QuickGELU) for m in self.model.modules())
        resized = create(self.arch, None, quick_gelu=quick_gelu, preprocess=preprocess, image_size=size)
        state = self.model.state_dict()
        resize_pos_embed(state, resized.model)
        _resize_attention_pool(state, resized.model)
        resized.model.load_state_dict(state)
        resized.model.train(self.model.training)
        self.model, self.train_transform, self.eval_transform = resized.model, *resized.transforms()

    def transforms(self) -> tuple[Any, Any]:
        return self.train_transform, self.eval_transform

    def _vit(self, key: str, supported: str) -> VisionTransformer:
        if not isinstance(self.model.visual, VisionTransformer):
            raise unsupported(f"{key} ({self.arch}, a {type(self.model.visual).__name__} image tower)", self, supported)
        return self.model.visual

    def spec(self) -> dict[str, Any]:
        uses_quick_gelu = any(isinstance(m, QuickGELU) for m in self.model.modules())
        spec = {
            "backend": self.backend,
            "arch": self.arch,
            "quick_gelu": uses_quick_gelu,
            "preprocess": dict(self.model.visual.preprocess_cfg),
        }
        if isinstance(self.model.visual, (VisionTransformer, ModifiedResNet)):  # rebuilt at this size (resizable)
            spec["image_size"] = self.model.visual.image_size
        return json.loads(json.dumps(spec))  # tuples -> lists: the spec equals what model.json reads back

    def save_assets(self, folder: Path) -> None:
        """A Hugging Face text tower's config and tokenizer (open_clip models such as roberta-ViT-B-32 name a hub
        model for them), so `rebuild` needs no hub; open_clip's own towers need nothing besides `spec()`."""
        text = getattr(self.model, "text", None)
        if isinstance(text, HFTextEncoder):
            text.config.save_pretrained(Path(folder) / HF_TEXT_ASSETS)
            self._tokenizer.tokenizer.save_pretrained(Path(folder) / HF_TEXT_ASSETS)

    # --- export

    def export_formats(self) -> tuple[str, ...]:
        hf = ("hf",) if self._hf_refusal() is None else ()
        return ("cliptune", "open_clip", *hf, "onnx")

    def _hf_refusal(self) -> str | None:
        from cliptune.models.openclip_hf import refusal

        if not hasattr(self._tokenizer, "sot_token_id"):
            return f"{self.arch!r} uses a Hugging Face tokenizer, not CLIP's BPE"
        return self._tokenizer_refusal() or refusal(self.model)

    def _tokenizer_refusal(self) -> str | None:
        """Why CLIP's transformers tokenizer cannot reproduce this model's BPE tokenizer settings, if it cannot."""
        settings = self.model_cfg()["text_cfg"].get("tokenizer_kwargs", {})
        if set(settings) - {"clean"} or settings.get("clean", "lower") != "lower":
            return f"its tokenizer settings {settings} (CLIP's tokenizer lower-cases and does nothing else)"
        return None

    def model_cfg(self) -> dict[str, Any]:
        """open_clip's architecture config of this model, as `open_clip_config.json` stores it."""
        cfg = _arch_config(self.arch)
        if cfg is None:
            raise self.cannot_export("open_clip", f"open_clip has no config for {self.arch!r}")
        if any(isinstance(m, QuickGELU) for m in self.model.modules()):
            cfg["quick_gelu"] = True  # a tag or model.json may force it on an architecture that defaults to GELU
        if isinstance(self.model.visual, (VisionTransformer, ModifiedResNet)):  # model.image_size may have resized it
            size = self.model.visual.image_size  # ViT: (h, w); ResNet: an int
            cfg["vision_cfg"]["image_size"] = size[0] if isinstance(size, tuple) else size
        return json.loads(json.dumps(cfg))

    def to_open_clip(self) -> OpenClipExport:
        preprocess = json.loads(json.dumps(dict(self.model.visual.preprocess_cfg)))
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        tokenizer = self._tokenizer
        save = tokenizer.save_pretrained if callable(getattr(tokenizer, "save_pretrained", None)) else None
        return OpenClipExport(self.model_cfg(), preprocess, state, save)

    def to_hf(self) -> HFExport:
        from cliptune.models.openclip_hf import clip_image_processor, clip_model

        why = self._hf_refusal()
        if why is not None:
            raise self.cannot_export("hf", f"transformers' CLIPModel cannot hold {self.arch!r}: {why}")
        preprocess = dict(self.model.visual.preprocess_cfg)
        return HFExport(clip_model(self.model, self.model_cfg()), self.hf_tokenizer(), clip_image_processor(preprocess))

    def hf_tokenizer(self) -> Any:
        from cliptune.models.openclip_hf import clip_tokenizer

        inner = getattr(self._tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if not hasattr(self._tokenizer, "sot_token_id") and inner is not None:
            inner = copy.copy(inner)
            inner.model_max_length = self._tokenizer.context_length
            return inner
        why = self._tokenizer_refusal()
        if why is not None:
            raise self.cannot_export("onnx", f"no transformers tokenizer reproduces {self.arch!r}'s: {why}")
        return clip_tokenizer(self._tokenizer.context_length)

    def text_length_free(self) -> bool:
        return self._trims_text()

    def linear_head_folds(self) -> bool:
        visual, projection = self.model.visual, getattr(self.model, "text_projection", None)
        image = getattr(visual, "proj", None) is not None or isinstance(getattr(visual, "attnpool", None), nn.Module)
        return image and isinstance(projection, (nn.Parameter, nn.Linear))

    @torch.no_grad()
    def fold_linear_head(self, tower: Tower, weight: torch.Tensor) -> None:
        if tower == "text":
            _fold(self.model, "text_projection", weight)
        elif getattr(self.model.visual, "proj", None) is not None:  # ViT: x @ proj
            _fold(self.model.visual, "proj", weight)
        else:  # ModifiedResNet: the attention pool's output Linear is the projection
            _fold(self.model.visual.attnpool, "c_proj", weight)


def _fold(owner: nn.Module, name: str, weight: torch.Tensor) -> None:
    """owner.name (a [W, D] matrix used as x @ P, or a Linear) followed by x -> x @ weight.T, as one projection."""
    projection = getattr(owner, name)
    weight = weight.to(device=_device(projection), dtype=_dtype(projection))
    if isinstance(projection, nn.Linear):
        projection.weight.copy_(weight @ projection.weight)
        if projection.bias is not None:
            projection.bias.copy_(weight @ projection.bias)
        return
    projection.copy_(projection @ weight.T)  # a head is D -> D: the shape stays


def _device(p: nn.Module | torch.Tensor) -> torch.device:
    return p.weight.device if isinstance(p, nn.Linear) else p.device


def _dtype(p: nn.Module | torch.Tensor) -> torch.dtype:
    return p.weight.dtype if isinstance(p, nn.Linear) else p.dtype


_VIT_STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patchnorm_pre_ln")
_RESNET_STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
_TEXT_STEM = ("token_embedding", "positional_embedding", "cls_emb")
_RESBLOCKS = r"transformer\.resblocks\.(\d+)\."


def _openclip_layers(module: nn.Module, tower: Tower) -> Found | None:
    """Block layouts of open_clip's ViT, ModifiedResNet and text transformer, for layer-wise lr decay."""
    if is_from(module, "open_clip", "VisionTransformer") and hasattr(module, "transformer"):
        n = len(module.transformer.resblocks)
        return Found("openclip-vit", n, rule(_RESBLOCKS, _VIT_STEM, n))
    if is_from(module, "open_clip", "ModifiedResNet"):
        return Found("openclip-resnet", 4, rule(r"layer([1-4])\.", _RESNET_STEM, 4, offset=0))
    if is_from(module, "open_clip", "TextTransformer"):
        n = len(module.transformer.resblocks)
        return Found("openclip-text", n, rule(_RESBLOCKS, _TEXT_STEM, n))
    if tower == "text" and is_from(module, "open_clip", "CLIP") and hasattr(module, "token_embedding"):
        # open_clip's CLIP keeps its text transformer flat on the model, beside `visual` and `logit_scale`.
        n = len(module.transformer.resblocks)
        return Found("openclip-text", n, rule(_RESBLOCKS, _TEXT_STEM, n), whole=False)
    return None


def pretrained_archs() -> list[tuple[str, list[str]]]:
    """(architecture, its pretrained tags) for every open_clip architecture but the packaged tiny ones."""
    return [(n, open_clip.list_pretrained_tags_by_model(n)) for n in open_clip.list_models() if n not in TINY_ARCHS]


def _check_arch(arch: str) -> None:
    names = open_clip.list_models()
    if arch in names or arch.startswith(("hf-hub:", "local-dir:")):
        return
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ModelError(f"model.arch: {arch!r} is not an OpenCLIP architecture.{hint} `cliptune models` lists them all.")


def _check_pretrained(arch: str, pretrained: str | None) -> None:
    if pretrained is None or Path(pretrained).expanduser().is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained in tags:
        return
    if any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ModelError(f"model.pretrained: checkpoint file {pretrained!r} does not exist.")
    known = f"known tags for {arch}: {', '.join(tags)}" if tags else f"{arch} has no published weights"
    raise ModelError(f"model.pretrained: {pretrained!r} is neither a file nor a pretrained tag ({known}).")


def build(cfg: ModelConfig) -> OpenClipModel:
    return create(cfg.arch, cfg.pretrained)


def _resize_attention_pool(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """A ResNet attention pool's position table in `state` resampled to `model`'s grid, in place.

    open_clip's `resize_pos_embed` only knows the ViT's table. The pool's [1 + grid^2, width] table has the same
    layout as a ViT's (the mean-pooled token first, then the grid row by row), so timm's `resample_abs_pos_embed`
    (bicubic, antialiased, as open_clip resizes ViT tables) resamples the grid and keeps the first token.
    """
    old = state.get(_ATTNPOOL_POSITIONS)
    if old is None or not isinstance(model.visual, ModifiedResNet):
        return
    grid = model.visual.image_size // RESNET_STRIDE
    state[_ATTNPOOL_POSITIONS] = resample_abs_pos_embed(old[None], [grid, grid], num_prefix_tokens=1)[0]


def rebuild(spec: dict[str, Any], folder: Path | None = None) -> OpenClipModel:
    """The architecture a saved `spec()` describes, random-initialised: the saved weights are loaded after."""
    _check_preprocess(spec.get("preprocess") or {})
    size = spec.get("image_size")
    text = Path(folder) / HF_TEXT_ASSETS if folder is not None else None
    return create(
        spec["arch"],
        None,
        quick_gelu=spec.get("quick_gelu", False),
        preprocess=spec.get("preprocess"),
        image_size=size[0] if isinstance(size, list) else size,
        hf_text=text if text is not None and text.is_dir() else None,
    )


def _arch_config(arch: str) -> dict[str, Any] | None:
    """open_clip's architecture config of `arch` (a `local-dir:` folder's own), None if open_clip has none."""
    schema, identifier = parse_model_name(arch)
    if schema == "local-dir":
        return json.loads((Path(identifier) / "open_clip_config.json").read_text())["model_cfg"]
    return open_clip.get_model_config(identifier)


def _hf_text_from(arch: str, assets: Path) -> tuple[dict[str, Any], Any]:
    """(create_model keywords, tokenizer) that build `arch`'s Hugging Face text tower from the config and tokenizer
    `save_assets` wrote, random-initialised (the saved weights are loaded after): no hub, no weights fetched twice."""
    cfg = _arch_config(arch)
    if cfg is None:
        raise ModelError(f"model.arch: open_clip has no config for {arch!r}; register it before loading this model")
    text_cfg = {**cfg["text_cfg"], "hf_model_name": str(assets), "hf_tokenizer_name": str(assets)}
    text_cfg["hf_model_pretrained"] = False  # open_clip's create_model sets it on its own copy, which this replaces
    tokenizer = open_clip.tokenizer.HFTokenizer(
        str(assets),
        context_length=text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        **text_cfg.get("tokenizer_kwargs", {}),
    )
    return {"text_cfg": text_cfg, "pretrained_hf": False}, tokenizer


# What open_clip's image_transform accepts (it asserts these, which would surface as a bare AssertionError).
_PREPROCESS_CHOICES = {
    "interpolation": ("bicubic", "bilinear", "random"),
    "resize_mode": ("shortest", "longest", "squash"),
}


def _check_preprocess(pre: dict[str, Any]) -> None:
    for key, choices in _PREPROCESS_CHOICES.items():
        if key in pre and pre[key] not in choices:
            raise ModelError(f"field preprocess.{key} is {pre[key]!r}; it must be one of {', '.join(choices)}")
    for key in ("mean", "std"):
        value = pre.get(key)
        numbers = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        if key in pre and not (numbers and len(value) == 3 and all(math.isfinite(v) for v in value)):
            raise ModelError(f"field preprocess.{key} is {value!r}; it must be a list of 3 finite numbers")
        if key == "std" and numbers and any(v <= 0 for v in value):
            raise ModelError(f"field preprocess.std is {value!r}; every value must be > 0")


def create(
    arch: str,
    pretrained: str | None,
    quick_gelu: bool = False,
    preprocess: dict | None = None,
    image_size: int | None = None,
    hf_text: Path | None = None,
) -> OpenClipModel:
    """An OpenCLIP model; `quick_gelu`, `preprocess` and `image_size` carry what a tag or a resize set, so a saved
    model rebuilds exactly; `hf_text`, a saved Hugging Face text tower's config and tokenizer (`save_assets`)."""
    _check_arch(arch)
    _check_pretrained(arch, pretrained)
    pre = preprocess or {}
    kwargs = dict(
        image_mean=pre.get("mean"),
        image_std=pre.get("std"),
        image_interpolation=pre.get("interpolation"),
        image_resize_mode=pre.get("resize_mode"),
    )
    if quick_gelu:
        kwargs["force_quick_gelu"] = True
    if image_size is not None:
        kwargs["force_image_size"] = image_size
    tokenizer = None
    if hf_text is not None:
        text_kwargs, tokenizer = _hf_text_from(arch, hf_text)
        kwargs.update(text_kwargs)
    try:
        # open_clip warns on the root logger that a model without `pretrained` is random: that is what was asked.
        with _root_log_level(logging.ERROR if pretrained is None else logging.root.level), _weights_only():
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                arch, pretrained=str(Path(pretrained).expanduser()) if _is_file(pretrained) else pretrained, **kwargs
            )
    except Exception as e:
        error = _load_error(e, arch, pretrained)
        if error is e:
            raise
        raise error from e
    return OpenClipModel(arch, model, train_tf, eval_tf, tokenizer)


def _load_error(e: Exception, arch: str, pretrained: str | None) -> Exception:
    """What to tell the user when open_clip could not build `arch` with `pretrained` (or `e` itself, unexpected)."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, UnpicklingError):
        return ModelError(
            f"model.pretrained: {pretrained} holds more than tensors (a pickle that could run code), so it is "
            f"refused ({first}). Convert it to .safetensors where you trust it"
        )
    if _is_file(pretrained):  # a local file that is truncated, not a checkpoint, or for another architecture
        return ModelError(
            f"model.pretrained: {pretrained} could not be loaded into {arch} ({type(e).__name__}: {first[:300]}); "
            "check that the file is complete and was saved for this architecture"
        )
    if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "download" in str(e).lower()):
        # Offline, open_clip raises OSError subclasses or a RuntimeError("Failed to download ...").
        return ModelError(
            f"could not fetch pretrained weights {arch}:{pretrained}: the model hub is unreachable from here "
            f"({type(e).__name__}). Download the checkpoint where you are online and set model.pretrained to the "
            "local file path (or set HF_HUB_OFFLINE=1 to fail fast when a cached copy is expected)."
        )
    return e


def _text_pooling(model: nn.Module) -> tuple[str, int | None]:
    """(pool type, end-token id) of the text tower: CLIP stores them flat, CustomTextCLIP on its text module."""
    if hasattr(model, "text"):
        return getattr(model.text, "pool_type", ""), getattr(model.text, "eos_id", None)
    return model.text_pool_type, getattr(model, "text_eos_id", None)


def _end_positions(tokens: torch.Tensor, pool: str, eos_id: int | None) -> torch.Tensor:
    """Index of each caption's end token: open_clip's own pooling rule applied to the positions themselves."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return text_global_pool(positions, tokens, pool, eos_token_id=eos_id)


def _text_states(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """ln_final outputs [B, L, width] of open_clip's text transformer (CLIP flat pieces or a TextTransformer)."""
    length = tokens.shape[1]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast) + tower.positional_embedding[:length].to(cast)
    mask = getattr(tower, "attn_mask", None)
    return tower.ln_final(tower.transformer(x, attn_mask=None if mask is None else mask[:length, :length]))


def _project(x: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    # open_clip's text projection is a matrix, a Linear (proj_type 'linear'), or absent.
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x if projection is None else x @ projection


@contextmanager
def _output_tokens(visual: VisionTransformer) -> Iterator[None]:
    """Switch on open_clip's `output_tokens` for one call: the tower then returns (pooled, tokens)."""
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        yield
    finally:
        visual.output_tokens = previous


@contextmanager
def _weights_only() -> Iterator[None]:
    """Every torch.load inside open_clip reads tensors only, even its fallback call that passes no weights_only."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    previous = logging.root.level
    logging.root.setLevel(level)
    try:
        yield
    finally:
        logging.root.setLevel(previous)


def _is_file(path: str | None) -> bool:
    return path is not None and Path(path).expanduser().is_file()


# ---------------------------------------------------------------------------------------------------------------
# Prompt tuning: this backend's text tower with prompt vectors inserted (`cliptune.models.prompted`)


def _openclip_tower(base: Any) -> nn.Module:
    # CustomTextCLIP holds a text module; CLIP holds the same pieces flat on the model.
    return base.model.text if hasattr(base.model, "text") else base.model


class OpenClipText(TextPath):
    def __init__(self, base: Any) -> None:
        model, tower = base.model, _openclip_tower(base)
        pieces = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(tower, p) for p in pieces):
            raise ModelError(
                f"prompt tuning: the text tower of open_clip model {base.arch!r} ({type(tower).__name__}) is not a "
                "built-in text transformer (an HF text encoder?); prompt tuning supports open_clip's TextTransformer"
            )
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise ModelError(f"prompt tuning: {base.arch!r} appends a CLS embedding or masks padding; not supported")
        if not hasattr(base._tokenizer, "sot_token_id"):
            raise ModelError(f"prompt tuning: {base.arch!r} uses an HF tokenizer; only open_clip's own is supported")
        flat = tower is model
        self.pool = model.text_pool_type if flat else tower.pool_type
        self.eos_id = model.text_eos_id if flat else tower.eos_id
        if self.pool not in ("argmax", "eos", "first", "last"):
            raise ModelError(f"prompt tuning: {base.arch!r} pools its text tower with {self.pool!r}; not supported")
        self.width = int(tower.token_embedding.embedding_dim)
        self.length = int(tower.positional_embedding.shape[0])
        self.at = 1  # open_clip's tokenizer starts every caption with <start_of_text>

    def tokenize(self, base: Any, texts: list[str], length: int) -> torch.Tensor:
        # open_clip truncates to `length` and writes <end_of_text> into the last slot.
        return base._tokenizer(list(texts), context_length=length)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where the base pools, in caption coordinates (before the prompts)."""
        if self.pool == "argmax":  # <end_of_text> has the highest id
            return tokens.argmax(dim=-1)
        if self.pool == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def features(
        self, base: Any, tokens: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        tower = _openclip_tower(base)
        cast = tower.transformer.get_cast_dtype()
        x = insert_prompts(tower.token_embedding(tokens).to(cast), prompt.to(cast), self.at)
        length = x.shape[1]
        x = x + tower.positional_embedding[:length].to(cast)  # after the insertion: prompts get positions 1..n
        mask = getattr(tower, "attn_mask", None)
        x = tower.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
        x = tower.ln_final(x)
        pooled = x[rows(x), shift_index(self.pool_index(tokens), self.at, prompt.shape[0])]
        projection = tower.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
