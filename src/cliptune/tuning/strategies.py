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


def changing_state(model: ClipModel, adapted: list[str]) -> dict[str, torch.Tensor]:
    """A copy of the tensors that training can change, taken before any adapter is added, for WiSE-FT.

    That is every trainable parameter, the buffers (BatchNorm statistics) of towers that are not fully locked, and
    whole towers that LoRA will adapt (their merged weights change). Locked weights are the same at both ends of
    a run, so they are not stored twice.
    """
    locked = set(fully_locked_towers(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    keep = {}
    for name, value in model.state_dict().items():
        tower = model.tower_of(name)
        if name in trainable or tower in adapted or (name in buffers and tower not in locked):
            keep[name] = value.detach().cpu().clone().contiguous()
    return keep


def save_initial_state(state: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_write(path) as tmp:
        save_file(state, str(tmp))


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
