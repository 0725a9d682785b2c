"""Composed backend: a dual encoder made of any pretrained image tower and any pretrained text tower (LiT / ITRA).

Each tower's pooled features go through a new projection head (linear, or Linear-GELU-Linear) into a shared
`embed_dim` space, with a learnable temperature. The heads and the temperature belong to neither pretrained tower
("shared"), so locking both towers trains just the heads: locked-tower tuning. The towers themselves are built by
`cliptune.models.towers`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.config import ModelConfig, TowerConfig
from cliptune.models.base import DROP_PATH_SUPPORT, IMAGE_SIZE_SUPPORT, Tower, TrunkHeadModel, unsupported
from cliptune.models.errors import ModelError
from cliptune.models.layers import Found, library_layers
from cliptune.models.prompted import TextPath, hf_tokenize, insert_prompts, rows, shift_index, start_offset
from cliptune.models.towers import (
    DROP_PATH,
    INPUT_SIZE,
    POOLING,
    ImageTower,
    Preprocess,
    TextTower,
    build_image_tower,
    build_text_tower,
    drop_path_blocks,
    rebuild_image_tower,
    rebuild_text_tower,
    tower_layers,
)

IMAGE_ASSETS = "image_tower"  # sub-folders of a saved model's folder, written by save_assets
TEXT_ASSETS = "text_tower"
_DEFAULT_ARCH = ModelConfig.__dataclass_fields__["arch"].default  # an OpenCLIP name, meaningless here


def _linear_head(width: int, dim: int) -> nn.Module:
    return nn.Linear(width, dim, bias=False)  # as CLIP's projections: the features are normalised after it


def _mlp_head(width: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))


HEADS = {"linear": _linear_head, "mlp": _mlp_head}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything besides the towers that fixes the architecture, as saved in `spec()`."""

    arch: str
    image_cfg: TowerConfig
    text_cfg: TowerConfig
    head: str = "linear"
    embed_dim: int = 256
    init_temperature: float = 0.07


class ComposedClip(TrunkHeadModel):
    backend = "composed"
    text_attention_mask = True  # the text tower masks padding

    def __init__(self, layout: Layout, image: ImageTower, text: TextTower) -> None:
        super().__init__()
        if layout.head not in HEADS:
            raise ModelError(f"model.head: {layout.head!r} is unknown; choose one of {', '.join(HEADS)}")
        if layout.embed_dim <= 0 or layout.init_temperature <= 0:
            raise ModelError("model.embed_dim and model.init_temperature must both be > 0")
        self.layout = layout
        self.image_tower = image.trunk
        self.text_tower = text
        self.image_projection = HEADS[layout.head](image.width, layout.embed_dim)
        self.text_projection = HEADS[layout.head](text.width, layout.embed_dim)
        # Registered directly: register_parameter's name check would trip over the base class's property.
        self._parameters["logit_scale"] = nn.Parameter(torch.tensor(math.log(1.0 / layout.init_temperature)))
        self.image_width, self.text_width = image.width, text.width
        self.preprocess, self.image_extras, self._image_hf_config = image.preprocess, image.extras, image.hf_config
        self.train_transform, self.eval_transform = image.preprocess.transforms()
        self.image_size: int | None = None  # set by set_image_size; None: the tower's own

    # --- the four pieces, public so a trainer can cache what a locked tower produces

    def image_trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower features [B, image_width], before the head."""
        return self.image_tower(images)

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        """Projection of image-tower features into the shared space [B, embed_dim], not normalised."""
        return self.image_projection(features)

    def text_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled text-tower features [B, text_width], before the head."""
        return self.text_tower(tokens)

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.text_projection(features)

    # --- optional hooks: each image-tower library's own mechanism (towers.DROP_PATH / INPUT_SIZE, by source)

    def set_drop_path(self, rate: float) -> int:
        """The tower's own stochastic depth at `rate`; 0 also turns off what its library builds in by default
        (efficientnet-lite 0.2, torchvision ConvNeXt 0.1 / EfficientNet 0.2, a Hugging Face config's rate)."""
        if rate == 0 and not drop_path_blocks(self.image_tower):
            return 0  # nothing to turn off: no tower is rebuilt, and towers without the mechanism are fine
        self.image_tower = self._tower_hook("model.drop_path", DROP_PATH, DROP_PATH_SUPPORT)(
            self.image_tower, self.layout.image_cfg.name, rate
        )
        return drop_path_blocks(self.image_tower)

    def set_image_size(self, size: int) -> None:
        self.image_tower = self._tower_hook("model.image_size", INPUT_SIZE, IMAGE_SIZE_SUPPORT)(
            self.image_tower, self.layout.image_cfg.name, size
        )
        self.preprocess = dataclasses.replace(self.preprocess, size=size)
        self.train_transform, self.eval_transform = self.preprocess.transforms()
        self.image_size = size

    def _tower_hook(self, key: str, hooks: dict[str, Any], supported: str) -> Any:
        source = self.layout.image_cfg.source
        if source not in hooks:
            raise unsupported(f"{key} (a {source} image tower)", self, supported)
        return hooks[source]

    # --- the ClipModel interface

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.text_tower.tokenize(texts)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self._parameters["logit_scale"]

    def tower_of(self, param_name: str) -> Tower:
        if param_name.startswith("image_tower."):
            return "image"
        if param_name.startswith("text_tower."):
            return "text"
        return "shared"  # the new heads and logit_scale: trainable even when both towers are locked

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        modules = {
            "image": [self.image_tower],
            "text": [self.text_tower],
            "shared": [self.image_projection, self.text_projection],
        }
        return modules[tower]

    def recognise_layers(self, module: nn.Module, tower: Tower) -> Found | None:
        return library_layers(module) or tower_layers(module)

    def text_path(self) -> TextPath:
        return ComposedText(self)

    def spec(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "backend": self.backend,
            "arch": lay.arch,
            "image_tower": dataclasses.asdict(lay.image_cfg),
            "text_tower": dataclasses.asdict(lay.text_cfg),
            "head": lay.head,
            "embed_dim": lay.embed_dim,
            "init_temperature": lay.init_temperature,
            "image_features": self.image_width,
            "text_features": self.text_width,
            "preprocess": dataclasses.asdict(self.preprocess),
            "image_extras": dict(self.image_extras),
            "token_length": self.text_tower.length,
            **({"image_size": self.image_size} if self.image_size is not None else {}),
        }

    # --- export

    def to_hf(self) -> Any:
        # VisionTextDualEncoderModel, transformers' class for two separate towers, pools the text tower with its
        # pooler output (BERT: dense + tanh on [CLS]) and the image tower likewise; this model pools the hidden
        # states itself and projects with its own heads, so no transformers class embeds as it does.
        why = (
            f"transformers' VisionTextDualEncoderModel pools the text tower with its pooler (dense + tanh on the first "
            f"token), while this model {self.text_tower.pooling}-pools the text tower's hidden states, so the "
            "embeddings would change"
        )
        raise self.cannot_export("hf", why)

    def hf_tokenizer(self) -> Any:
        tokenizer = copy.deepcopy(self.text_tower.tokenizer)
        tokenizer.model_max_length = self.text_tower.length
        return tokenizer

    def encode_text_with_mask(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        x = self.text_head(self.text_tower(tokens, attention_mask))
        return F.normalize(x, dim=-1) if normalize else x

    def text_length_free(self) -> bool:
        return True  # padding is masked

    def linear_head_folds(self) -> bool:
        return True  # both heads end in a Linear

    @torch.no_grad()
    def fold_linear_head(self, tower: Tower, weight: torch.Tensor) -> None:
        head = self.image_projection if tower == "image" else self.text_projection
        last = head if isinstance(head, nn.Linear) else head[-1]
        last.weight.copy_(weight.to(last.weight) @ last.weight)
        if last.bias is not None:
            last.bias.copy_(weight.to(last.bias) @ last.bias)

    def save_assets(self, folder: Path) -> None:
        """Text tower config + tokenizer (and an HF image tower's config), so rebuild needs no hub."""
        folder = Path(folder)
        self.text_tower.model.config.save_pretrained(folder / TEXT_ASSETS)
        self.text_tower.tokenizer.save_pretrained(folder / TEXT_ASSETS)
        if self._image_hf_config is not None:
            self._image_hf_config.save_pretrained(folder / IMAGE_ASSETS)


def build(cfg: ModelConfig) -> ComposedClip:
    """The composed model a config describes, with both towers' pretrained weights and new heads."""
    if cfg.image_tower is None or cfg.text_tower is None:
        raise ModelError("model: the composed backend needs both model.image_tower and model.text_tower")
    arch = cfg.arch if cfg.arch != _DEFAULT_ARCH else "composed"
    layout = Layout(arch, cfg.image_tower, cfg.text_tower, cfg.head, cfg.embed_dim, cfg.init_temperature)
    return ComposedClip(layout, build_image_tower(cfg.image_tower), build_text_tower(cfg.text_tower)).eval()


def rebuild(spec: dict[str, Any], folder: Path | None = None) -> ComposedClip:
    """The architecture a saved `spec()` describes, random-initialised and offline: the weights are loaded after."""
    if folder is None or not (Path(folder) / TEXT_ASSETS).is_dir():
        raise ModelError(
            f"rebuilding a composed model needs its saved assets folder with {TEXT_ASSETS}/ (from save_model)"
        )
    folder = Path(folder)
    image_cfg, text_cfg = TowerConfig(**spec["image_tower"]), TowerConfig(**spec["text_tower"])
    pre = spec["preprocess"]
    preprocess = Preprocess(pre["size"], tuple(pre["mean"]), tuple(pre["std"]), pre["interpolation"], pre["crop_pct"])
    image = rebuild_image_tower(image_cfg, folder / IMAGE_ASSETS, spec.get("image_extras", {}), preprocess)
    text = rebuild_text_tower(text_cfg, folder / TEXT_ASSETS, spec["token_length"])
    if (image.width, text.width) != (spec["image_features"], spec["text_features"]):
        raise ModelError(
            f"saved spec widths {spec['image_features']}/{spec['text_features']} do not match the rebuilt towers"
        )
    layout = Layout(spec["arch"], image_cfg, text_cfg, spec["head"], spec["embed_dim"], spec["init_temperature"])
    model = ComposedClip(layout, image, text).eval()
    if spec.get("image_size") is not None:  # resized again: e.g. a timm ViT's position table has the saved shape
        model.set_image_size(int(spec["image_size"]))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Prompt tuning: this backend's text tower with prompt vectors inserted (`cliptune.models.prompted`)


class ComposedText(TextPath):
    def __init__(self, base: Any) -> None:
        tower = base.text_tower
        if "inputs_embeds" not in inspect.signature(tower.model.forward).parameters:
            raise ModelError(f"prompt tuning: text tower {type(tower.model).__name__} takes no inputs_embeds")
        self.width = int(tower.model.get_input_embeddings().embedding_dim)
        self.length = int(tower.length)
        self.at = start_offset(tower.tokenizer)  # BERT: after [CLS]

    def tokenize(self, base: Any, texts: list[str], length: int) -> torch.Tensor:
        return hf_tokenize(base.text_tower.tokenizer, texts, length)

    def features(
        self, base: Any, tokens: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        tower = base.text_tower
        n = prompt.shape[0]
        x = insert_prompts(tower.model.get_input_embeddings()(tokens), prompt, self.at)
        caption = tokens != tower.pad_id if mask is None else mask.bool()
        ones = torch.ones(tokens.shape[0], n, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([caption[:, : self.at], ones, caption[:, self.at :]], dim=1)  # the prompts are attended
        hidden = tower.model(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state
        if tower.pooling == "cls":  # the start token's state; with no start token, the caption's first token
            first = shift_index(torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device), self.at, n)
            pooled = hidden[rows(hidden), first]
        else:  # mean: over every attended position, the prompts included
            pooled = POOLING[tower.pooling](hidden, mask)
        return base.text_head(pooled)
