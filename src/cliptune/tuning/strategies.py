"""How fine-tuning strategies change the model before training: the `STRATEGIES` table (prompts, heads, LoRA).

Locking (`tuning.locking`) always runs; EMA and WiSE-FT act during and after training, not on the model's layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from cliptune.config import ConfigError, FinetuneConfig, LoraConfig
from cliptune.models.base import ClipModel, Tower
from cliptune.tuning.locking import fully_locked_towers
from cliptune.utils.files import atomic_write, tensor_bytes


@dataclass(frozen=True)
class Strategy:
    """One fine-tuning strategy: when it applies, and what it does at each stage of preparing the model.

    The stages run in this order for every enabled strategy, in `STRATEGIES` order: `wrap` (architecture changes,
    saved in the model's spec, so a resumed run rebuilds them instead), whole-tower and pattern locking
    (`tuning.locking`, always), `after_locking` (trainability the strategy insists on), the WiSE-FT starting
    state is recorded, then `adapt` (changes that must not be in that state, such as LoRA's adapters; the towers
    `adapted_towers` names are recorded whole because their merged weights change).
    """

    enabled: Callable[[FinetuneConfig], bool]
    wrap: Callable[[ClipModel, FinetuneConfig], ClipModel] | None = None
    after_locking: Callable[[ClipModel, FinetuneConfig], None] | None = None
    adapted_towers: Callable[[ClipModel, FinetuneConfig], list[Tower]] | None = None
    adapt: Callable[[ClipModel, FinetuneConfig], None] | None = None


def _add_prompts(model: ClipModel, cfg: FinetuneConfig) -> ClipModel:
    from cliptune.models.prompted import add_prompts

    return add_prompts(model, cfg.prompt_tokens)


def _add_heads(model: ClipModel, cfg: FinetuneConfig) -> ClipModel:
    from cliptune.models.heads import add_heads

    return add_heads(model, cfg.heads)


def keep_prompts_trainable(model: ClipModel, cfg: FinetuneConfig | None = None) -> None:
    """Prompt vectors live in the text tower but are what prompt tuning trains: tower locking must not freeze them."""
    from cliptune.models.prompted import PromptedModel

    for module in model.modules():
        if isinstance(module, PromptedModel):
            module.prompt.requires_grad_(True)


def _lora_towers(model: ClipModel, cfg: FinetuneConfig) -> list[Tower]:
    return list(lora_towers(model, cfg.lora).towers)


def _apply_lora(model: ClipModel, cfg: FinetuneConfig) -> None:
    from cliptune.tuning.lora import apply_lora

    apply_lora(model, lora_towers(model, cfg.lora))


# strategy name -> what it does. A new strategy adds one line here (its functions in its own module).
# Prompts go inside the text tower, heads on top of the finished embeddings: in that order.
STRATEGIES: dict[str, Strategy] = {
    "prompts": Strategy(lambda cfg: cfg.prompt_tokens > 0, wrap=_add_prompts, after_locking=keep_prompts_trainable),
    "heads": Strategy(lambda cfg: cfg.heads != "none", wrap=_add_heads),
    "lora": Strategy(lambda cfg: cfg.lora.rank > 0, adapted_towers=_lora_towers, adapt=_apply_lora),
}


def _enabled(cfg: FinetuneConfig) -> list[Strategy]:
    return [s for s in STRATEGIES.values() if s.enabled(cfg)]


def wrap(model: ClipModel, cfg: FinetuneConfig) -> ClipModel:
    """Add what changes the architecture (and so the saved spec): projection heads, learnable prompts."""
    for strategy in _enabled(cfg):
        if strategy.wrap is not None:
            model = strategy.wrap(model, cfg)
    return model


def after_locking(model: ClipModel, cfg: FinetuneConfig) -> None:
    for strategy in _enabled(cfg):
        if strategy.after_locking is not None:
            strategy.after_locking(model, cfg)


def adapted_towers(model: ClipModel, cfg: FinetuneConfig) -> list[Tower]:
    """Towers an `adapt` stage will change as a whole (recorded whole for WiSE-FT)."""
    towers: list[Tower] = []
    for strategy in _enabled(cfg):
        if strategy.adapted_towers is not None:
            towers += [t for t in strategy.adapted_towers(model, cfg) if t not in towers]
    return towers


def adapt(model: ClipModel, cfg: FinetuneConfig) -> None:
    for strategy in _enabled(cfg):
        if strategy.adapt is not None:
            strategy.adapt(model, cfg)


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
    with atomic_write(path, needed=tensor_bytes(state)) as tmp:
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
