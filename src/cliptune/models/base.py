"""The one model interface that training, tuning and evaluation use, whatever backend built the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from cliptune.models.errors import ModelError
from cliptune.models.layers import Found, LayerGroups, find_trunk, library_layers

if TYPE_CHECKING:
    from cliptune.models.prompted import TextPath

Tower = Literal["image", "text", "shared"]
TOWERS: tuple[Tower, ...] = ("image", "text", "shared")  # every tower a parameter can belong to
ENCODERS: tuple[Tower, Tower] = ("image", "text")  # the towers that encode something (and can be locked)
# Leading name components that torch's own wrappers add: DistributedDataParallel / DataParallel, torch.compile.
TORCH_WRAPPERS = ("module", "_orig_mod")
# Names (whole dotted components) that timm and Hugging Face transformers give the attention and MLP blocks whose
# projections LoRA adapts: timm's `attn` / `mlp`; CLIP/SigLIP-style `self_attn` / `mlp` (and SigLIP's pooling
# `attention`); BERT/ViT-style `attention`, `intermediate` and the block's `output.dense`.
TIMM_LORA_TARGETS: tuple[str, ...] = ("attn", "mlp")
HF_LORA_TARGETS: tuple[str, ...] = ("attention", "self_attn", "mlp", "intermediate", "output.dense")


def strip_components(name: str, components: tuple[str, ...] | frozenset[str]) -> str:
    """`name` without its leading dotted components that are in `components`; the last one is always kept.

    The one rule for unwrapping names: torch's wrappers (`TORCH_WRAPPERS`), and for display the containers every
    model class declares (`container_names`).
    """
    parts = name.split(".")
    start = 0
    while start < len(parts) - 1 and parts[start] in components:
        start += 1
    return ".".join(parts[start:])


def container_names() -> frozenset[str]:
    """Torch's wrappers plus the `containers` of every model class defined so far (built-in or registered)."""
    names: set[str] = set(TORCH_WRAPPERS)
    todo: list[type] = [ClipModel]
    while todo:
        cls = todo.pop()
        names.update(cls.containers)
        todo.extend(cls.__subclasses__())
    return frozenset(names)


# Who answers `encode_image_tokens` / `encode_text_tokens`: named in the error every other model raises.
DENSE_TOKEN_SUPPORT = "the openclip backend with a ViT image tower and the hf backend with a CLIP model"


def dense_tokens_unsupported(backend: str, why: str) -> NotImplementedError:
    """The error for a model that cannot return dense token features, saying what needs them and the way out."""
    return NotImplementedError(
        f"dense token features are not available from the {backend!r} backend: {why}. Only {DENSE_TOKEN_SUPPORT} "
        "(not wrapped with projection heads or prompt tuning) return them. loss.name 'fsc' needs them for its local "
        "hard-negative loss: use such a model, or set the local hard-negative loss weight (loss.local_weight) to 0."
    )


DROP_PATH_SUPPORT = (
    "OpenCLIP ViTs, Hugging Face CLIP / SigLIP and composed models with a timm, efficientnet-lite, torchvision "
    "(ConvNeXt, EfficientNet, Swin, MaxViT) or Hugging Face (config field drop_path_rate) image tower have it"
)
IMAGE_SIZE_SUPPORT = (
    "OpenCLIP ViTs and ResNets, Hugging Face CLIP / SigLIP and composed models with a timm, efficientnet-lite, "
    "torchvision or Hugging Face image tower can change input size"
)


class ImagePreprocessing(NamedTuple):
    """What a model's image input expects: square size in pixels, normalisation and resize interpolation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # torchvision / timm name: bicubic, bilinear, ...


def preprocessing_of(transform: Any) -> ImagePreprocessing:
    """Size, mean, std and interpolation read off a torchvision `Compose` (resize, centre crop, normalise)."""
    steps = list(getattr(transform, "transforms", [transform]))
    norms = [t for t in steps if isinstance(t, T.Normalize)]
    sizes = [t.size for t in steps if isinstance(t, (T.CenterCrop, T.Resize, T.RandomResizedCrop))]
    resizes = [t.interpolation for t in steps if isinstance(t, (T.Resize, T.RandomResizedCrop))]
    if not norms or not sizes:
        raise ValueError(f"cannot read the input size and normalisation off the transform {transform!r}")
    size = sizes[-1]  # the crop comes after the resize: it fixes the input
    size = size if isinstance(size, int) else size[0]
    mode = resizes[-1].value if resizes else "bicubic"
    return ImagePreprocessing(int(size), tuple(norms[-1].mean), tuple(norms[-1].std), mode)


def unsupported(what: str, model: nn.Module, supported: str) -> NotImplementedError:
    """The error of an optional hook a backend does not implement: which key asked for it and who supports it."""
    return NotImplementedError(f"{what} is not supported by the {type(model).__name__} model; {supported}")


class TextOverflow(NamedTuple):
    """Captions longer than the text context, which `tokenize` cuts short to it."""

    truncated: int  # how many of the captions asked about
    context_length: int  # tokens per caption, start and end tokens included
    first: int | None  # index of the first one cut short


# Captions tokenised at once when counting overflow: the untruncated ids of a whole large table would not fit.
_OVERFLOW_CHUNK = 4096


class ExportUnsupported(ModelError):
    """A model that the asked-for export format cannot hold; the message says why and which formats can."""


def tracing() -> bool:
    """Whether a graph is being recorded (ONNX export, TorchScript trace, torch.export).

    Shapes must not depend on tensor values then: a backend that trims padding with `int(...)` of a tensor would
    bake one batch's length into the graph, so it keeps the full length instead (the result is the same).
    """
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


@dataclass
class OpenClipExport:
    """What open_clip's hub folder holds: the architecture config, preprocessing, weights and tokenizer files."""

    model_cfg: dict[str, Any]  # open_clip's model config (embed_dim, vision_cfg, text_cfg, quick_gelu, ...)
    preprocess_cfg: dict[str, Any]  # mean, std, interpolation, resize_mode, size
    state_dict: dict[str, torch.Tensor]  # keys as open_clip's model has them
    save_tokenizer: Callable[[Path], None] | None = None  # writes HF tokenizer files, for models whose cfg names one


@dataclass
class HFExport:
    """A transformers model with its tokenizer and image processor: `save_pretrained` of each writes the folder."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    image_processor: Any


class ClipModel(nn.Module):
    """A dual encoder: image and text towers into one embedding space, plus a learnable temperature.

    A backend subclasses this and fills in the towers; everything else in cliptune talks only to these members:
    `encode_image`, `encode_text`, `logit_scale` (log of the inverse temperature), `tokenize`,
    `train_transform` / `eval_transform` (PIL image -> tensor), `tower_of` (which tower a parameter belongs
    to) and `spec` (JSON data that rebuilds the architecture without downloading anything).

    `encode_image_tokens` / `encode_text_tokens` (dense features for token-level losses such as FSC-CLIP's local
    hard-negative loss) are optional: a backend that cannot give them keeps the default, which raises.
    `text_overflow` (how many captions `tokenize` cuts short) is optional too: the default asks `hf_tokenizer`.

    Export (`cliptune.export`) asks the model itself: `export_formats` lists what it can be written as,
    `to_open_clip` / `to_hf` give the other library's model (the defaults raise `ExportUnsupported` naming the
    formats that can), `fold_linear_head` lets a wrapper's linear head become part of the output projection, and
    `text_attention_mask` / `encode_text_with_mask` / `text_length_free` describe the text input an exported graph
    takes. ONNX needs nothing else: it traces `encode_image` / `encode_text`.

    Optional hooks, each with a documented default, through which a backend answers for itself whatever training
    and tuning need to know about it (code outside `models/` never asks for a backend's class or library):
    `logit_bias` (None), `recognise_layers` / `layer_groups` (layer-wise lr decay), `text_path` (prompt tuning),
    `weight_readers` / `lora_targets` (LoRA), `containers` (display names), `has_trunk` / `trunk` / `head`
    (caching a locked tower), `check_dense_tokens` (FSC-CLIP's local loss).
    """

    backend: str = ""
    # The text tower reads a padding mask (BERT-like): an exported text encoder then takes `attention_mask` too.
    text_attention_mask: bool = False
    # Attribute names under which this model keeps a library model or another ClipModel (`model`, `base`):
    # display names and lock patterns leave them out (`container_names`).
    containers: tuple[str, ...] = ()
    train_transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, patches) from one forward pass, so a loss on both back-propagates through both.

        pooled: [B, D], L2-normalised, exactly what `encode_image` returns. patches: [B, P, D], one per image
        patch (class token excluded) after the tower's final norm and projection, not normalised.
        """
        raise dense_tokens_unsupported(self.backend, f"{type(self).__name__} does not implement encode_image_tokens")

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled, features, mask) from one forward pass.

        pooled: [B, D], L2-normalised, exactly what `encode_text` returns. features: [B, L, D], every position's
        final-norm output through the text projection, not normalised; L may be shorter than `tokens` (a causal
        tower stops at the batch's last end token). mask: [B, L] bool, True on a caption's content tokens *and*
        its end token (FSC-CLIP: "non-pad tokens, start token excluded"), False on the start token, padding and
        everything after the end token.
        """
        raise dense_tokens_unsupported(self.backend, f"{type(self).__name__} does not implement encode_text_tokens")

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def text_overflow(self, texts: list[str]) -> TextOverflow | None:
        """How many of `texts` have more tokens than `tokenize` keeps (they are cut short), so a run can say so.

        Default: `hf_tokenizer()` without truncation against its `model_max_length` (the length `tokenize` pads to);
        None, nothing counted, for a model that has no such tokenizer.
        """
        try:
            tokenizer = self.hf_tokenizer()
        except ModelError:
            return None
        limit, over = int(tokenizer.model_max_length), []
        for start in range(0, len(texts), _OVERFLOW_CHUNK):
            ids = tokenizer(list(texts[start : start + _OVERFLOW_CHUNK]), truncation=False, verbose=False)
            over += [start + i for i, row in enumerate(ids["input_ids"]) if len(row) > limit]
        return TextOverflow(len(over), limit, over[0] if over else None)

    @property
    def logit_scale(self) -> nn.Parameter:
        raise NotImplementedError

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """The learnable bias of a sigmoid loss (SigLIP) when the model has one; default None.

        A backend that owns one overrides this property (an `nn.Parameter` assigned to `self.logit_bias` would
        clash with it: register it as `self._parameters["logit_bias"]`, as `composed` does `logit_scale`).
        """
        return None

    def tower_of(self, param_name: str) -> Tower:
        raise NotImplementedError

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        """Sub-modules that make up a tower, so a locked tower can be put in eval mode as a whole."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_assets(self, folder: Path) -> None:
        """Write what rebuilding needs besides `spec()` and the weights (tokenizer files, tower configs)."""

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)

    # --- export hooks (cliptune.export)

    def export_formats(self) -> tuple[str, ...]:
        """Formats this model can be exported to. Default: cliptune's own, and ONNX (traced from the encoders)."""
        return ("cliptune", "onnx")

    def cannot_export(self, fmt: str, why: str) -> ExportUnsupported:
        """The error for a format that cannot hold this model: why, and the formats that can."""
        return ExportUnsupported(
            f"cannot export this {self.backend or type(self).__name__} model as {fmt!r}: {why}. "
            f"It can be exported as: {', '.join(self.export_formats())}"
        )

    def to_open_clip(self) -> OpenClipExport:
        """open_clip's config, preprocessing and weights for this model. Default: not an open_clip model."""
        raise self.cannot_export("open_clip", "only OpenCLIP-backend models are open_clip models")

    def to_hf(self) -> HFExport:
        """A transformers model, tokenizer and image processor that embed exactly as this model does.

        Default: none (transformers has no class for this architecture).
        """
        raise self.cannot_export("hf", f"transformers has no model class for a {self.backend!r} model")

    def hf_tokenizer(self) -> Any:
        """A transformers tokenizer giving the ids `tokenize` gives (padded to `model_max_length`), written beside
        exported graphs so that other runtimes tokenise alike. Default: none."""
        raise self.cannot_export("onnx", f"{type(self).__name__} has no transformers tokenizer to write beside it")

    def linear_head_folds(self) -> bool:
        """Whether `fold_linear_head` works: each tower ends in a linear projection (open_clip ViT/ResNet, CLIP)."""
        return False

    def fold_linear_head(self, tower: Tower, weight: torch.Tensor) -> None:
        """Make the tower's output projection P into `weight @ P`, in place (weight: [D_out, D]).

        A linear head on the *normalised* embedding then needs no module of its own: normalising, applying the
        head and normalising again points the same way as applying the head and normalising once, since
        normalisation only divides by a positive number.
        """
        raise NotImplementedError(f"{type(self).__name__} has no output projection to fold a linear head into")

    def encode_text_with_mask(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """`encode_text` with the padding mask given rather than derived from the ids (`text_attention_mask`).

        Default, for towers that read no mask: the mask is not used.
        """
        return self.encode_text(tokens, normalize=normalize)

    def text_length_free(self) -> bool:
        """Whether a caption's embedding is the same whatever length its ids are padded to (causal towers that
        pool at the end token, towers that mask padding): an exported text encoder then takes any length.
        Default: no, the ids must have the tokenizer's length."""
        return False

    # --- optional hooks (see the class docstring); the defaults suit any backend built from common libraries

    def recognise_layers(self, module: nn.Module, tower: Tower) -> Found | None:
        """The block layout of `module` if it is a tower trunk this backend knows, else None.

        Default: timm models (their own `group_matcher`) and Hugging Face-style encoders (`cliptune.models.layers`).
        A backend whose towers come from another library adds its own rule and falls back to this one.
        """
        return library_layers(module)

    def layer_groups(self, tower: Tower) -> LayerGroups:
        """Which layer each parameter of `tower` is in, for layer-wise lr decay (timm's `group_matcher`).

        Default: the outermost module that `recognise_layers` knows and that lies in the tower; a tower with no
        such module gets one id for every parameter (`kind` "unclassified": no decay, and a warning).
        """
        return find_trunk(self, tower)

    def text_path(self) -> TextPath:
        """How prompt tuning runs this model's text tower with prompt vectors inserted (`cliptune.models.prompted`).

        Default: not supported, a ModelError saying so.
        """
        raise ModelError(
            f"prompt tuning wraps a model whose backend knows its text tower (openclip, hf, composed), not a "
            f"{self.backend or type(self).__name__!r} one: add the prompts first and other wrappers (projection "
            "heads) on top"
        )

    def weight_readers(self) -> tuple[type[nn.Module], ...]:
        """Module types that read their child Linears' `.weight` instead of calling them (LoRA adapts those in
        weight space, `cliptune.tuning.lora`). Default: `nn.MultiheadAttention` (it reads `out_proj.weight`)."""
        return (nn.MultiheadAttention,)

    def lora_targets(self) -> tuple[str, ...]:
        """Module-name patterns (whole dotted components) whose Linear / attention layers get LoRA adapters when
        `finetune.lora.targets` is left empty (`cliptune.tuning.lora`). Default: the attention and MLP blocks of
        towers built from timm and Hugging Face transformers (`TIMM_LORA_TARGETS`, `HF_LORA_TARGETS`)."""
        return tuple(dict.fromkeys((*TIMM_LORA_TARGETS, *HF_LORA_TARGETS)))

    def has_trunk(self, tower: Tower) -> bool:
        """Whether `tower` splits into a trunk and a head (`trunk` / `head`), so a locked trunk's outputs can be
        computed once and reused while the head trains. Default False."""
        return False

    def trunk(self, tower: Tower, inputs: torch.Tensor) -> torch.Tensor:
        """The tower's trunk output for images or tokens (only where `has_trunk(tower)`)."""
        raise NotImplementedError(f"the {tower} tower of {type(self).__name__} does not split into trunk and head")

    def head(self, tower: Tower, features: torch.Tensor) -> torch.Tensor:
        """The tower's unnormalised embedding of trunk outputs (only where `has_trunk(tower)`)."""
        raise NotImplementedError(f"the {tower} tower of {type(self).__name__} does not split into trunk and head")

    def check_dense_tokens(self) -> None:
        """Raise NotImplementedError (saying why) when `encode_image_tokens` / `encode_text_tokens` cannot work.

        Default: run both once on a blank image and a short caption, so a run fails before training starts.
        """
        from PIL import Image

        image = self.eval_transform(Image.new("RGB", (64, 64)))[None]
        with torch.no_grad():
            self.encode_image_tokens(image)
            self.encode_text_tokens(self.tokenize(["a photo"]))

    # --- optional hooks for classification fine-tuning (FT-CLIP); a backend overrides what it supports

    def image_preprocessing(self) -> ImagePreprocessing:
        """The image input's size, mean/std and interpolation, so an augmentation pipeline can match them.

        Default: read off `eval_transform` (a torchvision Compose with a resize or crop and a Normalize).
        """
        return preprocessing_of(self.eval_transform)

    def set_drop_path(self, rate: float) -> int:
        """Stochastic depth on the image tower's residual blocks, the rate rising linearly to `rate` at the last
        block (timm's rule); returns the number of blocks. Active in training mode only: evaluation is unchanged.
        Every run calls it with `model.drop_path`: rate 0 must turn off any drop path the tower's library builds in.

        Default: rate 0 changes nothing (no drop path to turn off); others are unsupported (NotImplementedError
        naming the backends that do it).
        """
        if rate == 0:
            return 0
        raise unsupported("model.drop_path", self, DROP_PATH_SUPPORT)

    def set_image_size(self, size: int) -> None:
        """Take `size` x `size` images: position embeddings interpolated the way the tower's library does, the
        transforms rebuilt, and `spec()` / `save_assets` recording the size so the saved model rebuilds at it.

        Default: unsupported (raises NotImplementedError naming the backends that do it).
        """
        raise unsupported("model.image_size", self, IMAGE_SIZE_SUPPORT)

    def tower_parameters(self, tower: Tower) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if self.tower_of(n) == tower}

    def set_grad_checkpointing(self, enable: bool = True) -> int:
        """Turn on each tower library's own activation checkpointing; returns how many modules took it.

        open_clip and timm models have `set_grad_checkpointing`, Hugging Face models `gradient_checkpointing_enable`;
        every such sub-module is switched (nested ones too: the switch is idempotent). transformers is asked for the
        non-reentrant variant, which also back-propagates through blocks whose inputs need no gradient (a model
        whose embeddings are locked).
        """
        switched = 0
        for module in self.modules():
            if module is self or isinstance(module, ClipModel):
                continue
            if callable(getattr(module, "set_grad_checkpointing", None)):
                module.set_grad_checkpointing(enable)
                switched += 1
            elif getattr(module, "supports_gradient_checkpointing", False) and hasattr(
                module, "is_gradient_checkpointing"
            ):
                if enable:
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                else:
                    module.gradient_checkpointing_disable()
                switched += 1
        if not switched and enable:
            raise ValueError(
                f"train.grad_checkpointing: no tower of this {self.backend or type(self).__name__} model supports "
                "activation checkpointing (open_clip, timm and Hugging Face towers do); set it to false"
            )
        return switched


class TrunkHeadModel(ClipModel):
    """A model whose towers split into a trunk and a projection head.

    The split lets a locked trunk's outputs be computed once and reused (`cliptune.features.TrunkCache`) while the
    heads train.
    """

    def has_trunk(self, tower: Tower) -> bool:
        return tower in ENCODERS

    def trunk(self, tower: Tower, inputs: torch.Tensor) -> torch.Tensor:
        return self.image_trunk(inputs) if tower == "image" else self.text_trunk(inputs)

    def head(self, tower: Tower, features: torch.Tensor) -> torch.Tensor:
        return self.image_head(features) if tower == "image" else self.text_head(features)

    def image_trunk(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_head(self.image_trunk(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_head(self.text_trunk(tokens))
        return F.normalize(x, dim=-1) if normalize else x
