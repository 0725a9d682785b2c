"""Exponential moving average (EMA) of a model's trainable weights, for evaluation and export.

After every optimizer step `update` moves a float32 shadow copy towards the live weights:
shadow = decay * shadow + (1 - decay) * param. Evaluation runs inside `applied(model)`, which swaps the shadow in
and puts the raw weights back on exit, so training always continues from the raw weights.

What is tracked:
- parameters that are trainable (requires_grad) when the EMA is built: build it after locking, so frozen weights
  (which never move, so their average is themselves) cost no memory and no time;
- persistent buffers (BatchNorm running statistics, counters) are *copied*, not averaged, at every update: they
  are statistics of the raw weights' activations and averaging them has no meaning (timm's `exclude_buffers`).
  The copies make `copy_to` and `state_dict` complete on their own.

Optional warm-up (`warmup=True`, off by default): the t-th update (t = 0, 1, ...) uses
decay_t = min(decay, (1 + t) / (10 + t)), as timm and ITRA do, so the early average is not dominated by the
pre-trained starting point when training runs for few steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """A float32 shadow of the trainable parameters of `model`, plus copies of its persistent buffers."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay!r} must be in [0, 1]")
        self.decay, self.warmup, self.num_updates = float(decay), warmup, 0
        params = dict(model.named_parameters())
        self.param_names = [n for n, p in params.items() if p.requires_grad]
        self.buffer_names = _persistent_buffer_names(model)
        with torch.no_grad():
            self.shadow = [params[n].detach().float().clone() for n in self.param_names]
            buffers = dict(model.named_buffers())
            self.buffers = [buffers[n].detach().clone() for n in self.buffer_names]

    # -- averaging ---------------------------------------------------------------------------------------------

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average; call once after every optimizer step."""
        params, buffers = self._live(model)
        decay = self.current_decay()
        if params:
            self._follow_device(params[0].device)
            # float32 shadow even for bf16/fp16 weights: (1 - decay) * param is below their resolution otherwise.
            values = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in params]
            torch._foreach_mul_(self.shadow, decay)
            torch._foreach_add_(self.shadow, values, alpha=1.0 - decay)
        for copy, live in zip(self.buffers, buffers):
            copy.copy_(live)
        self.num_updates += 1

    # -- using the average -------------------------------------------------------------------------------------

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked weights (and buffers) with the EMA ones, for good."""
        params, buffers = self._live(model)
        for live, value in zip(params + buffers, self.shadow + self.buffers):
            live.copy_(value)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block the model holds the EMA weights; on exit its raw weights are back, bit for bit."""
        params, buffers = self._live(model)
        with torch.no_grad():
            raw = [t.detach().clone() for t in params + buffers]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for live, value in zip(params + buffers, raw):
                    live.copy_(value)

    # -- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of everything an exact resume needs (for torch.save, e.g. in a checkpoint's state.pt)."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "params": {n: t.detach().cpu().clone() for n, t in zip(self.param_names, self.shadow)},
            "buffers": {n: t.detach().cpu().clone() for n, t in zip(self.buffer_names, self.buffers)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; like an optimizer's, the saved decay, warm-up and update count win."""
        _check_names("parameters", self.param_names, state["params"])
        _check_names("buffers", self.buffer_names, state["buffers"])
        for name, tensor in zip(self.param_names, self.shadow):
            tensor.copy_(state["params"][name])
        for name, tensor in zip(self.buffer_names, self.buffers):
            tensor.copy_(state["buffers"][name])
        self.decay, self.warmup, self.num_updates = float(state["decay"]), bool(state["warmup"]), state["num_updates"]

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = [t.to(device) for t in self.shadow]
        self.buffers = [t.to(device) for t in self.buffers]
        return self

    # -- helpers -----------------------------------------------------------------------------------------------

    def _live(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model's tensors that this EMA tracks, in the shadow's order (looked up by name, so a rebuilt model
        such as the one of a resumed run works too)."""
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        missing = [n for n in self.param_names if n not in params] + [n for n in self.buffer_names if n not in buffers]
        if missing:
            raise ValueError(f"EMA: the model lacks {len(missing)} tracked tensor(s), e.g. {missing[:3]}")
        return [params[n] for n in self.param_names], [buffers[n] for n in self.buffer_names]

    def _follow_device(self, device: torch.device) -> None:
        # The trainer may build the EMA before model.to(device); follow the model once instead of failing per step.
        if self.shadow and self.shadow[0].device != device:
            self.to(device)


def _persistent_buffer_names(model: nn.Module) -> list[str]:
    # Non-persistent buffers (e.g. causal attention masks) are constants rebuilt by the model, never saved.
    saved = set(model.state_dict())
    return [n for n, _ in model.named_buffers() if n in saved]


def _check_names(kind: str, expected: list[str], saved: dict[str, torch.Tensor]) -> None:
    if set(expected) != set(saved):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(
            f"EMA state does not match this model's trainable {kind}: missing {missing[:3]}, unexpected {extra[:3]} "
            "(was the model locked differently when the state was saved?)"
        )
