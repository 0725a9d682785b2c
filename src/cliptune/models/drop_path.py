"""Stochastic depth (drop path) added to residual branches of towers whose library has no drop-path slot.

open_clip's `ResidualAttentionBlock` and transformers' CLIP / SigLIP encoder layers compute `x + branch(x)` with no
drop path. A forward hook on each branch's last module multiplies its output by timm's `drop_path` (a per-sample
Bernoulli mask scaled by 1 / keep), which is exactly where timm's ViT applies it (`x + drop_path(ls(attn(norm(x))))`).
Hooks add no parameters, so state dicts and saved models are unchanged, and `drop_path` is the identity outside
training mode, so evaluation outputs are unchanged too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import drop_path
from torch import nn

_HANDLES = "_cliptune_drop_path_hooks"  # attribute on the tower root: the hooks, removed when the rate is set again


def linear_rates(rate: float, blocks: int) -> list[float]:
    """timm's schedule: 0 at the first block rising linearly to `rate` at the last."""
    return [float(r) for r in torch.linspace(0.0, rate, blocks)]


def _hook(rate: float) -> Any:
    def apply(module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # transformers' attention returns (states, weights)
            return (drop_path(output[0], rate, module.training), *output[1:])
        return drop_path(output, rate, module.training)

    return apply


def add_drop_path(root: nn.Module, branches: Sequence[Sequence[nn.Module]], rate: float) -> int:
    """Drop path on every residual branch: `branches[k]` are block k's branch-final modules. Returns the blocks.

    Calling it again replaces the earlier hooks (rate 0 removes them).
    """
    for handle in getattr(root, _HANDLES, []):
        handle.remove()
    handles = []
    if rate > 0:
        for block_rate, modules in zip(linear_rates(rate, len(branches)), branches):
            if block_rate > 0:
                handles += [m.register_forward_hook(_hook(block_rate)) for m in modules]
    object.__setattr__(root, _HANDLES, handles)  # not a module attribute: nothing is registered or saved
    return len(branches) if rate > 0 else 0


__all__ = ["add_drop_path", "linear_rates"]
