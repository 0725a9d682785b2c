"""How a fine-tuning strategy changes the model before training: new heads or prompts, and what stays locked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from cliptune.config import ConfigError, FinetuneConfig, LoraConfig
from cliptune.models.base import ClipModel
from cliptune.tuning.locking import fully_locked_towers
from cliptune.utils.files import atomic_write


def wrap(model: ClipModel, cfg: FinetuneConfig) -> ClipModel:
    """Add what changes the architecture (and so the saved spec): projection heads, learnable prompts."""
    # Prompts go inside the text tower, heads on top of the finished embeddings: in that order.
    if cfg.prompt_tokens:
        from cliptune.models.prompted import add_prompts

        model = add_prompts(model, cfg.prompt_tokens)
    if cfg.heads != "none":
        from cliptune.models.heads import add_heads

        model = add_heads(model, cfg.heads)
    return model


def keep_prompts_trainable(model: ClipModel) -> None:
    """Prompt vectors live in the text tower but are what prompt tuning trains: tower locking must not freeze them."""
    from cliptune.models.prompted import PromptedModel

    for module in model.modules():
        if isinstance(module, PromptedModel):
            module.prompt.requires_grad_(True)


def save_initial_state(model: ClipModel, before_adapters: dict[str, torch.Tensor], path: Path) -> None:
    """Starting weights of the towers that train (as plain, adapter-free tensors); locked towers never change."""
    locked = set(fully_locked_towers(model))
    keep = {k: v.contiguous() for k, v in before_adapters.items() if model.tower_of(k) not in locked}
    with atomic_write(path) as tmp:
        save_file(keep, str(tmp))


def lora_towers(model: ClipModel, cfg: LoraConfig) -> LoraConfig:
    """LoRA adapts the towers it names that are not locked: `lock_image: true` keeps the image tower as it is."""
    locked = set(fully_locked_towers(model))
    towers = [t for t in cfg.towers if t not in locked]
    if not towers:
        raise ConfigError(
            f"finetune.lora.towers: {cfg.towers} are all locked (finetune.lock_image / lock_text); "
            "unlock one, or set lora.rank: 0"
        )
    return dataclasses.replace(cfg, towers=towers)
