"""OpenCLIP backend: any open_clip architecture, with a pretrained tag, a local checkpoint file, or random init."""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from cliptune.config import ModelConfig
from cliptune.models.base import ClipModel, Tower
from cliptune.models.errors import ModelError

_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Registering our tiny architectures with open_clip keeps one code path for tiny and real models.
open_clip.add_model_config(_CONFIG_DIR)
TINY_ARCHS = sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))

# Text-tower members of open_clip's CLIP class, which keeps its text transformer flat on the model.
_FLAT_TEXT = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")


class OpenClipModel(ClipModel):
    backend = "openclip"

    def __init__(self, arch: str, model: nn.Module, train_transform: Any, eval_transform: Any) -> None:
        super().__init__()
        self.arch = arch
        self.model = model
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self._tokenizer = open_clip.get_tokenizer(arch)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

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
        m = self.model
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length]))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        projection = m.text_projection
        if isinstance(projection, nn.Linear):
            return projection(x)
        return x if projection is None else x @ projection

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts)

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

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        if tower == "image":
            return [self.model.visual]
        if tower == "text":
            if hasattr(self.model, "text"):
                return [self.model.text]
            return [m for n in _FLAT_TEXT if isinstance(m := getattr(self.model, n, None), nn.Module)]
        return []

    def spec(self) -> dict[str, Any]:
        uses_quick_gelu = any(isinstance(m, QuickGELU) for m in self.model.modules())
        spec = {
            "backend": self.backend,
            "arch": self.arch,
            "quick_gelu": uses_quick_gelu,
            "preprocess": dict(self.model.visual.preprocess_cfg),
        }
        return json.loads(json.dumps(spec))  # tuples -> lists: the spec equals what model.json reads back


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


def rebuild(spec: dict[str, Any], folder: Path | None = None) -> OpenClipModel:
    """The architecture a saved `spec()` describes, random-initialised: the saved weights are loaded after."""
    return create(spec["arch"], None, quick_gelu=spec.get("quick_gelu", False), preprocess=spec.get("preprocess"))


def create(
    arch: str, pretrained: str | None, quick_gelu: bool = False, preprocess: dict | None = None
) -> OpenClipModel:
    """An OpenCLIP model; `quick_gelu` and `preprocess` carry what a tag set, so a saved model rebuilds exactly."""
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
    try:
        # open_clip warns on the root logger that a model without `pretrained` is random: that is what was asked.
        with _root_log_level(logging.ERROR if pretrained is None else logging.root.level):
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                arch, pretrained=str(Path(pretrained).expanduser()) if _is_file(pretrained) else pretrained, **kwargs
            )
    except (OSError, RuntimeError) as e:
        # Offline, open_clip raises OSError subclasses or a RuntimeError("Failed to download ...").
        if isinstance(e, RuntimeError) and "download" not in str(e).lower():
            raise
        raise ModelError(
            f"could not fetch pretrained weights {arch}:{pretrained}: the model hub is unreachable from here "
            f"({type(e).__name__}). Download the checkpoint where you are online and set model.pretrained to the "
            "local file path (or set HF_HUB_OFFLINE=1 to fail fast when a cached copy is expected)."
        ) from e
    return OpenClipModel(arch, model, train_tf, eval_tf)


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
