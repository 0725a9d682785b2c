"""Hugging Face backend: a transformers `CLIPModel` or `SiglipModel` from a hub id or a `save_pretrained` folder.

It wraps the model with its tokenizer and image preprocessing behind the `ClipModel` interface, writes the HF
config, tokenizer and preprocessor files beside a saved model (`<folder>/hf/`) so that it rebuilds offline, and turns
an unreachable hub or an unusable folder into a `ModelError` that says what to change.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import model_info
from huggingface_hub.errors import HfHubHTTPError
from torch import nn
from torchvision import transforms as T
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipImageProcessor,
    SiglipModel,
)
from transformers.utils import ModelOutput

from cliptune.config import ModelConfig
from cliptune.models.base import ClipModel, HFExport, Tower, dense_tokens_unsupported, tracing
from cliptune.models.drop_path import add_drop_path
from cliptune.models.errors import ModelError
from cliptune.models.prompted import TextPath, hf_tokenize, insert_prompts, rows, shift_index, start_offset

log = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {"clip": CLIPModel, "siglip": SiglipModel}
ASSETS_DIR = "hf"  # sub-folder of a saved model holding the HF config, tokenizer and preprocessor files

# Parameter-name prefixes (inside the HF model) -> tower. SigLIP has no projection modules: its heads live in
# `vision_model.head` / `text_model.head`. Everything else (logit_scale, SigLIP's logit_bias) is shared.
_TOWER_PREFIXES: dict[str, Tower] = {
    "vision_model.": "image",
    "visual_projection.": "image",
    "text_model.": "text",
    "text_projection.": "text",
}
_TOWER_ATTRS: dict[str, tuple[str, ...]] = {
    "image": ("vision_model", "visual_projection"),
    "text": ("text_model", "text_projection"),
}
_PROBE_TIMEOUT_S = 5.0  # the hub client retries a failed download for ~25 s per file; the probe answers at once
# Vocabulary files of fast, BPE and SentencePiece tokenizers: a folder without any of them has no tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "vocab.txt")
# PIL resampling codes (what preprocessor_config.json stores) -> torchvision modes.
_INTERPOLATION = {
    0: T.InterpolationMode.NEAREST,
    1: T.InterpolationMode.LANCZOS,
    2: T.InterpolationMode.BILINEAR,
    3: T.InterpolationMode.BICUBIC,
    4: T.InterpolationMode.BOX,
    5: T.InterpolationMode.HAMMING,
}


class HFClipModel(ClipModel):
    """A transformers CLIP or SigLIP model with its tokenizer and torchvision versions of its image processor."""

    backend = "hf"
    containers = ("model",)  # the transformers model

    def __init__(self, arch: str, model: PreTrainedModel, tokenizer: Any, image_processor: Any) -> None:
        super().__init__()
        self.arch = arch
        self.model = model
        self.model_type: str = model.config.model_type
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # fixed-length batches need a pad token; CLIP pads with its EOS as well
            tokenizer.pad_token = tokenizer.eos_token
        self.image_processor = image_processor
        self.context_length: int = model.config.text_config.max_position_embeddings
        self.train_transform, self.eval_transform = image_transforms(image_processor)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = _pooled(self.model.get_image_features(pixel_values=images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.model_type == "clip":
            features = self._clip_text_features(tokens)
        else:
            # SigLIP pools the *last* position and was trained on max_length padding without an attention mask
            # (as its processor does): `tokenize` pads to the full length, so passing no mask is the faithful input.
            features = _pooled(self.model.get_text_features(input_ids=tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def _clip_text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's text embedding: the projected final state at each caption's first end-of-text token.

        The tokenizer may pad with that same token (OpenAI's does), so neither `tokens != pad_token_id` (it would
        mask the EOS itself) nor transformers' argmax pooling for old configs (eos_token_id == 2, right only while
        the EOS is the highest id) is safe: the first EOS is found here and the mask covers the tokens up to it.
        """
        hidden, eos = self._clip_text_states(tokens)
        return self.model.text_projection(hidden[torch.arange(tokens.shape[0], device=tokens.device), eos])

    def _clip_text_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-norm states [B, L, width] up to the batch's last first-EOS, that EOS index per caption)."""
        eos = self.eos_positions(tokens)
        # Attention is causal, so columns after every row's EOS cannot change any pooled state: dropping them
        # gives the same embeddings and saves most of the text tower's work on short captions.
        length = tokens.shape[1] if tracing() else int(eos.max()) + 1  # a traced graph keeps the input's length
        tokens = tokens[:, :length]
        mask = (torch.arange(length, device=tokens.device)[None, :] <= eos[:, None]).long()
        return self.model.text_model(input_ids=tokens, attention_mask=mask).last_hidden_state, eos

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One vision forward: the pooled class token as `encode_image` has it, and the patch states after it.

        transformers applies the post-layernorm to the class token only; the patches get the same norm and the
        visual projection here, as open_clip's `ln_post` and `proj` treat every token.
        """
        self._require_clip("encode_image_tokens")
        vision = self.model.vision_model
        out = vision(pixel_values=images)
        pooled = self.model.visual_projection(out.pooler_output)
        patches = self.model.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 1:]))
        return F.normalize(pooled, dim=-1), patches

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every position's final-norm state through the text projection, over the batch's longest caption
        (L = the last first-EOS + 1, see `_clip_text_states`); the pooled feature is the first EOS's."""
        self._require_clip("encode_text_tokens")
        hidden, eos = self._clip_text_states(tokens)
        features = self.model.text_projection(hidden)
        pooled = features[torch.arange(features.shape[0], device=features.device), eos]
        tokens = tokens[:, : features.shape[1]]
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eos[:, None]
        if self.tokenizer.bos_token_id is not None:  # CLIP's tokenizer starts every caption with it
            mask &= tokens != self.tokenizer.bos_token_id
        return F.normalize(pooled, dim=-1), features, mask

    def _require_clip(self, method: str) -> None:
        if self.model_type != "clip":
            # SigLIP pools images with an attention head and has no projection that applies to single patches.
            why = f"{method} supports CLIP models only; {self.arch!r} is a {self.model_type!r} model"
            raise dense_tokens_unsupported(self.backend, why)

    def eos_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the first end-of-text token in each row (0 for a row without one)."""
        return (tokens == self.tokenizer.eos_token_id).int().argmax(dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        # A fixed length (the text tower's positions), not the batch's longest: callers tokenise one caption at a
        # time and stack them, and SigLIP must see the full padding it was trained with.
        if not texts:  # the tokenizer fails on an empty batch
            return torch.empty((0, self.context_length), dtype=torch.long)
        out = self.tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return out["input_ids"].long()

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """SigLIP's learnable sigmoid-loss bias (kept in the state dict); None for CLIP."""
        return getattr(self.model, "logit_bias", None)

    def tower_of(self, param_name: str) -> Tower:
        name = param_name.removeprefix("model.")
        for prefix, tower in _TOWER_PREFIXES.items():
            if name.startswith(prefix):
                return tower
        return "shared"

    def text_path(self) -> TextPath:
        return HFText(self)

    def lora_targets(self) -> tuple[str, ...]:
        # CLIP and SigLIP encoder layers: `self_attn` (q/k/v/out_proj), `mlp` (fc1, fc2); SigLIP's attention-pooling
        # head: `attention` (an nn.MultiheadAttention) and its `mlp`.
        return ("self_attn", "mlp", "attention")

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        modules = (getattr(self.model, attr, None) for attr in _TOWER_ATTRS.get(tower, ()))
        return [m for m in modules if isinstance(m, nn.Module)]

    def spec(self) -> dict[str, Any]:
        return {"backend": self.backend, "arch": self.arch, "model_type": self.model_type}

    # --- export: the model already is a transformers model

    def export_formats(self) -> tuple[str, ...]:
        return ("cliptune", "hf", "onnx")

    def to_hf(self) -> HFExport:
        # A copy: a wrapper may fold a head into this model only for the time it takes to call this
        return HFExport(copy.deepcopy(self.model), self.hf_tokenizer(), self.image_processor)

    def hf_tokenizer(self) -> Any:
        tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer.model_max_length = self.context_length  # `tokenize` pads to this length
        return tokenizer

    def text_length_free(self) -> bool:
        return self.model_type == "clip"  # causal, pooled at the EOS; SigLIP pools the last padded position

    def linear_head_folds(self) -> bool:
        return self.model_type == "clip"  # SigLIP's image head ends in a residual MLP, not a projection

    @torch.no_grad()
    def fold_linear_head(self, tower: Tower, weight: torch.Tensor) -> None:
        if not self.linear_head_folds():
            super().fold_linear_head(tower, weight)
        projection = self.model.visual_projection if tower == "image" else self.model.text_projection
        projection.weight.copy_(weight.to(projection.weight) @ projection.weight)
        if projection.bias is not None:
            projection.bias.copy_(weight.to(projection.bias) @ projection.bias)

    def set_drop_path(self, rate: float) -> int:
        """Drop path on the attention and MLP branches of every vision encoder layer (CLIP and SigLIP alike)."""
        layers = self.model.vision_model.encoder.layers
        return add_drop_path(self.model.vision_model, [(layer.self_attn, layer.mlp) for layer in layers], rate)

    def set_image_size(self, size: int) -> None:
        """Position embeddings resampled by the vision embeddings' own `interpolate_pos_encoding` (bicubic), the
        vision config and the image processor set to `size`: both are saved, so the model rebuilds at that size."""
        resize_vision_embeddings(self.model.vision_model.embeddings, size)
        self.model.config.vision_config.image_size = size
        _resize_processor(self.image_processor, size)
        self.train_transform, self.eval_transform = image_transforms(self.image_processor)

    def save_assets(self, folder: Path) -> None:
        """Write the HF config, tokenizer and preprocessor config to `folder/hf/`: `rebuild` needs nothing else."""
        assets = Path(folder) / ASSETS_DIR
        assets.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(assets)
        self.tokenizer.save_pretrained(assets)
        self.image_processor.save_pretrained(assets)


def resize_vision_embeddings(embeddings: nn.Module, size: int) -> None:
    """A CLIP / SigLIP vision embeddings module taking `size` x `size` images from now on.

    The new position table is what transformers' `interpolate_pos_encoding` computes for such an image on every
    forward (`interpolate_pos_encoding=True`), stored once so the model is a plain model of the new size.
    """
    extra = embeddings.num_positions - embeddings.num_patches  # CLIP: the class token's position; SigLIP: none
    patches = (size // embeddings.patch_size) ** 2
    table = embeddings.position_embedding.weight
    with torch.no_grad():
        probe = table.new_zeros(1, patches + extra, table.shape[1])  # only its shape is read
        resized = embeddings.interpolate_pos_encoding(probe, size, size)[0]
    embeddings.position_embedding = nn.Embedding.from_pretrained(resized.detach().clone(), freeze=False)
    positions = torch.arange(patches + extra, device=table.device).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)
    embeddings.image_size, embeddings.num_patches, embeddings.num_positions = size, patches, patches + extra
    embeddings.config.image_size = size


def _resize_processor(processor: Any, size: int) -> None:
    """Point an HF image processor's resize (shortest edge, or height x width) and centre crop at `size`."""
    if _field(processor.size, "shortest_edge"):
        processor.size = {"shortest_edge": size}
    else:
        processor.size = {"height": size, "width": size}
    if getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": size, "width": size}


def _pooled(output: torch.Tensor | ModelOutput) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected embedding; 4.x a bare tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_transforms(processor: Any) -> tuple[T.Compose, T.Compose]:
    """(train, eval) torchvision transforms of PIL RGB images that follow an HF image processor's settings.

    Eval reproduces the processor: resize (shortest edge, or straight to height x width for SigLIP), centre crop
    if it crops, scale to [0, 1], normalise. Train swaps resize+crop for open_clip's mild RandomResizedCrop.
    """
    resize, crop = _resize_and_crop(processor)
    mode = _interpolation(getattr(processor, "resample", 3))
    if getattr(processor, "do_normalize", True):
        normalize = T.Normalize(mean=list(processor.image_mean), std=list(processor.image_std))
    else:
        normalize = T.Normalize(mean=[0.0] * 3, std=[1.0] * 3)
    out_size = crop or (resize if isinstance(resize, tuple) else (resize, resize))
    train = T.Compose([T.RandomResizedCrop(out_size, scale=(0.9, 1.0), interpolation=mode), T.ToTensor(), normalize])
    steps: list[Any] = [T.Resize(resize, interpolation=mode)]
    if crop is not None:
        steps.append(T.CenterCrop(crop))
    return train, T.Compose([*steps, T.ToTensor(), normalize])


def _resize_and_crop(processor: Any) -> tuple[int | tuple[int, int], tuple[int, int] | None]:
    """Resize target (an int is the shortest edge, as torchvision's Resize reads it) and centre-crop size or None."""
    size = processor.size
    if isinstance(size, int):
        resize: int | tuple[int, int] = size
    elif _field(size, "shortest_edge"):
        resize = int(_field(size, "shortest_edge"))
    else:
        resize = (int(_field(size, "height")), int(_field(size, "width")))
    crop_size = getattr(processor, "crop_size", None)
    if not getattr(processor, "do_center_crop", False) or crop_size is None:
        return resize, None
    if isinstance(crop_size, int):
        return resize, (crop_size, crop_size)
    return resize, (int(_field(crop_size, "height")), int(_field(crop_size, "width")))


def _field(size: Any, key: str) -> Any:
    # Processors hold sizes as dicts (4.x) or SizeDict objects (5.x).
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _interpolation(resample: Any) -> T.InterpolationMode:
    if isinstance(resample, T.InterpolationMode):
        return resample
    return _INTERPOLATION.get(int(resample), T.InterpolationMode.BICUBIC)


def build(cfg: ModelConfig) -> HFClipModel:
    """The pretrained model, tokenizer and preprocessing that `cfg.arch` (hub id or local folder) names."""
    source, local_only = _locate(cfg.arch)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as e:  # OSError: not found / no connection; ValueError: unknown type
        raise ModelError(_load_failure(cfg.arch, source, local_only, "its config", e)) from e
    model_cls = _model_class(config, cfg.arch)
    try:
        # fp32 whatever the checkpoint's dtype: training runs in fp32 (bf16 only under autocast).
        model = model_cls.from_pretrained(source, config=config, dtype=torch.float32, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelError(_load_failure(cfg.arch, source, local_only, "its weights", e)) from e
    tokenizer = _load_tokenizer(cfg.arch, source, local_only)
    processor = _load_image_processor(source, config, local_only)
    return HFClipModel(cfg.arch, model, tokenizer, processor)


def rebuild(spec: dict[str, Any], folder: Path | None = None) -> HFClipModel:
    """The architecture a saved `spec()` describes, random-initialised: the saved weights are loaded after.

    Everything comes from `folder/hf/` (no download). Without a folder, `spec["arch"]` is built as in training.
    """
    if folder is None:
        return build(ModelConfig(backend="hf", arch=spec["arch"]))
    assets = Path(folder) / ASSETS_DIR
    if not (assets / "config.json").is_file():
        raise ModelError(f"{folder} holds no {ASSETS_DIR}/config.json: it was not saved by the hf backend")
    config = AutoConfig.from_pretrained(assets, local_files_only=True)
    model = _model_class(config, spec["arch"])(config)
    tokenizer = _load_tokenizer(spec["arch"], str(assets), True)
    processor = _load_image_processor(str(assets), config, True)
    return HFClipModel(spec["arch"], model, tokenizer, processor)


def _model_class(config: PretrainedConfig, arch: str) -> type[PreTrainedModel]:
    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_CLASSES:
        raise ModelError(
            f"model.arch: {arch!r} is a {model_type!r} model; the hf backend supports "
            f"{' and '.join(MODEL_CLASSES)} (transformers CLIPModel, SiglipModel)"
        )
    return MODEL_CLASSES[model_type]


def _load_tokenizer(arch: str, source: str, local_only: bool) -> Any:
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        # transformers would quietly build an empty tokenizer for the model type (every word unknown).
        raise ModelError(
            f"model.arch: folder {folder} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer there too with `tokenizer.save_pretrained(folder)`"
        )
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except ImportError as e:  # SigLIP's SentencePiece tokenizer needs the optional `sentencepiece` package
        raise ModelError(f"the tokenizer of {arch!r} needs a package that is not installed: {e}") from e
    except (OSError, ValueError) as e:
        raise ModelError(_load_failure(arch, source, local_only, "its tokenizer", e)) from e


def _load_image_processor(source: str, config: PretrainedConfig, local_only: bool) -> Any:
    try:
        return AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        # Folders saved with only the model and tokenizer are common: use the library's defaults at the
        # model's own image size rather than refusing to load.
        log.warning("%s has no usable image processor config (%s); using %s defaults", source, e, config.model_type)
        return default_image_processor(config)


def default_image_processor(config: PretrainedConfig) -> Any:
    """transformers' default processor for the model type, at the vision tower's image size."""
    side = config.vision_config.image_size
    if config.model_type == "siglip":
        return SiglipImageProcessor(size={"height": side, "width": side})
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _locate(arch: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether to use local files only) for a folder or hub id."""
    path = Path(arch).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.arch: folder {path} holds no config.json; save a model there with "
                "`model.save_pretrained(folder)` (and its tokenizer and processor with theirs)"
            )
        return str(path), True
    if path.exists():
        raise ModelError(f"model.arch: {arch!r} is a file; the hf backend needs a hub id or a save_pretrained folder")
    if _looks_like_path(arch):
        raise ModelError(f"model.arch: folder {arch!r} does not exist (nor is it a hub id)")
    # Unreachable hub (offline flag or failed probe): still fine when the files are in the local HF cache.
    return arch, _offline() or not _hub_reachable(arch)


def _looks_like_path(arch: str) -> bool:
    # Hub ids are `name` or `owner/name`; anything else can only have meant a local folder.
    return arch.startswith((".", "~")) or Path(arch).is_absolute() or arch.count("/") > 1 or "\\" in arch


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the environment is read again so a later change counts.
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(hub_constants.HF_HUB_OFFLINE) or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _hub_reachable(repo_id: str) -> bool:
    """Whether the hub answers at all (one request, short timeout): downloads retry for ~25 s per file."""
    try:
        model_info(repo_id, timeout=_PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        return True  # the hub answered (missing, private or gated repo): from_pretrained reports the details
    except Exception:  # connection, DNS, proxy, timeout: whatever stops an answer means "use the cache only"
        return False
    return True


def _load_failure(arch: str, source: str, local_only: bool, what: str, error: Exception) -> str:
    reason = f"{type(error).__name__}: {error}"
    if Path(source).is_dir():
        return f"model.arch: could not load {what} from folder {source} ({reason})"
    if local_only:
        return (
            f"model.arch: {arch!r} is not a local folder, the Hugging Face hub is unreachable from here (offline or "
            f"no connection) and {what} is not in the local cache ({reason}). Where you are online, save the model, "
            "tokenizer and image processor with `save_pretrained(folder)` and point model.arch at that local folder."
        )
    return f"model.arch: could not load {what} of {arch!r} from the Hugging Face hub ({reason})"


# ---------------------------------------------------------------------------------------------------------------
# Prompt tuning: this backend's text tower with prompt vectors inserted (`cliptune.models.prompted`)


class HFText(TextPath):
    def __init__(self, base: Any) -> None:
        if base.model_type not in ("clip", "siglip"):
            raise ModelError(f"prompt tuning: hf model type {base.model_type!r} is not supported (clip, siglip)")
        self.causal = base.model_type == "clip"  # CLIP: causal, pools the first EOS; SigLIP: no mask, pools last
        self.width = int(base.model.text_model.embeddings.token_embedding.embedding_dim)
        self.length = int(base.context_length)
        self.at = start_offset(base.tokenizer)  # CLIP: after <|startoftext|>; SigLIP: no start token, so 0

    def tokenize(self, base: Any, texts: list[str], length: int) -> torch.Tensor:
        return hf_tokenize(base.tokenizer, texts, length)

    def features(
        self, base: Any, tokens: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        text = base.model.text_model
        x = insert_prompts(text.embeddings.token_embedding(tokens), prompt, self.at)
        n = prompt.shape[0]
        if self.causal:
            index = shift_index(base.eos_positions(tokens), self.at, n)
            # Causal attention: positions after every row's EOS change no pooled state, so they are dropped.
            if not tracing():  # a traced graph keeps the input's length
                x = x[:, : int(index.max()) + 1]
            length = x.shape[1]
            blocked = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            mask = torch.zeros(length, length, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(blocked, torch.finfo(x.dtype).min)[None, None]
        else:
            index = torch.full((x.shape[0],), x.shape[1] - 1, dtype=torch.long, device=x.device)
            mask = None
        hidden = text.embeddings(inputs_embeds=x)  # adds the position embeddings 0..S-1
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        pooled = text.final_layer_norm(hidden)[rows(hidden), index]
        return base.model.text_projection(pooled) if self.causal else text.head(pooled)
