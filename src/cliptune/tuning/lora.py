"""LoRA: low-rank adapters on the attention and MLP projections of the image and text towers, on every backend.

`apply_lora` gives every matched projection W a trainable update scale * B @ A (A: rank x in, Kaiming-uniform;
B: out x rank, zeros, so the model is unchanged at first; scale = alpha / rank) and freezes every original
parameter of the towers that got adapters. `merge_lora` folds the updates into the weights and removes the
adapters, so the state dict has exactly the original keys again and `save_model` writes a plain model.

Two kinds of adapter, because projections are used in two ways:

* An `nn.Linear` that is *called* (HF CLIP/SigLIP, BERT, OpenCLIP's MLP `c_fc`/`c_proj`, timm blocks) gets peft's
  LoRA `Linear` layer through `peft.inject_adapter_in_model`: y = W x + scale * B A dropout(x). Its parameters are
  `<module>.lora_A.default.weight` / `<module>.lora_B.default.weight`, next to `<module>.base_layer.weight`.
* A weight that its owner *reads* instead of calling a module gets a hand-written weight-space adapter: reading
  the weight returns W + scale * B @ A (see `WeightLora`). `nn.MultiheadAttention` (OpenCLIP's transformer
  blocks, SigLIP's attention-pooling head) passes its raw `in_proj_weight` (q, k and v stacked, 3d x d) and
  `out_proj.weight` to `F.multi_head_attention_forward` and never calls `out_proj`; OpenCLIP's ResNet `attnpool`
  does the same with its q/k/v/c_proj Linear weights. Which module types read weights, the model says
  (`ClipModel.weight_readers`), as it says which modules to adapt when `finetune.lora.targets` is empty
  (`ClipModel.lora_targets`). The base weight keeps its name and state-dict key; the
  adapter is `<module>.lora_weights.<weight name>.lora_A` / `.lora_B`. The in-projection gets one rank-`rank`
  adapter per q, k and v (A: 3 x rank x d, B: 3 x d x rank), as separate q/k/v Linears get elsewhere, so a rank
  means the same on every backend. Input dropout cannot be expressed in weight space: `dropout` applies to the
  Linear adapters only (a warning says so).

Why not peft for the second kind (checked against peft 0.21.2):
* peft's `lora.MultiheadAttention` merges the adapter into the weights before every forward and unmerges after:
  each forward replaces the frozen `in_proj_weight` / `out_proj.weight` Parameter objects with new ones (which
  breaks anything holding references: DDP, EMA, optimizer or hook bookkeeping), and W + d - d drifts the frozen
  weights by rounding (about 1e-6 after 50 steps, measured). It also shares one rank-r adapter between q, k and
  v, cannot use dropout, and refuses attention with kdim/vdim != embed_dim.
* peft's `target_parameters` (`ParamWrapper`) and its Linear layer only take effect when the wrapped module's
  forward runs: on `attnpool.q_proj` (weights read by the parent) the adapter is silently ignored (measured:
  nonzero B, unchanged output).
* `inject_adapter_in_model` freezes every non-adapter parameter of the whole model (logit_scale, the other tower,
  new heads): `apply_lora` restores those flags afterwards and removes the `peft_config` attribute it leaves.

Names: every adapter parameter has a `lora_` component and lives under its module's name, so `tower_of`,
optimizer grouping and checkpoints keep working. While adapters are in place the keys of peft-wrapped weights
change (`<module>.base_layer.weight`): a checkpoint of an adapted model loads into a model that `apply_lora`
adapted with the same config; `merge_lora` first to export a plain model.

WiSE-FT with LoRA: the fine-tuned weights are theta_0 + delta, so interpolating with alpha gives theta_0 +
alpha * delta: `scale_lora(model, alpha)` then `merge_lora` equals WiSE on the merged weights when nothing but
the adapters changed (other trained tensors, such as logit_scale, need the usual interpolation).
"""

from __future__ import annotations

import logging
import math
import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from cliptune.config import LoraConfig
from cliptune.models.base import ENCODERS, ClipModel, Tower

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "lora_"  # every adapter parameter has a dotted name component starting with this
_TARGETS_KEY = "finetune.lora.targets"
_IN_PROJ = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class LoraDelta(nn.Module):
    """A weight-space low-rank update: W -> W + scale * B @ A (per block for stacked q/k/v weights).

    blocks=1: A is rank x in, B is out x rank. blocks=n: the weight is n projections stacked along the output
    dimension (an MHA in_proj_weight: q, k, v), each with its own adapter: A is n x rank x in, B n x out/n x rank.
    """

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, blocks: int = 1) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if out_features % blocks:
            raise ValueError(f"a {tuple(weight.shape)} weight cannot be split into {blocks} stacked projections")
        kw = {"device": weight.device, "dtype": weight.dtype}
        a_shape = (rank, in_features) if blocks == 1 else (blocks, rank, in_features)
        b_shape = (out_features, rank) if blocks == 1 else (blocks, out_features // blocks, rank)
        a = torch.empty(a_shape, **kw)
        for block in a.view(-1, rank, in_features):  # as nn.Linear and peft: Kaiming-uniform, per projection
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **kw))
        self.scale = scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).reshape(-1, self.lora_A.shape[-1]) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)

    def extra_repr(self) -> str:
        return f"A={tuple(self.lora_A.shape)}, B={tuple(self.lora_B.shape)}, scale={self.scale:g}"


class WeightLora:
    """Marks a module whose weights are read as attributes and carry weight-space adapters.

    `apply_lora` swaps the module's class for a subclass (below) in which reading an adapted weight returns
    W + delta: the base weight stays registered under its own name (its state-dict key does not change) and the
    adapters live in the module's `lora_weights` ModuleDict. The subclasses are fixed, module-level classes, so
    adapted models deepcopy and pickle as usual (torch's parametrize creates a class per module, which deepcopy
    shares between copies: merging one copy then breaks the other). `merge_lora` restores the original class.
    """

    _lora_base: type[nn.Module]


_ADAPTERS = "lora_weights"  # the ModuleDict attribute of a WeightLora module: weight name -> LoraDelta


def _adapted_weight(name: str) -> property:
    def get(self: nn.Module) -> torch.Tensor | None:
        base = self._parameters.get(name)
        adapters = self._modules.get(_ADAPTERS)
        if base is None or adapters is None or name not in adapters:
            return base
        return adapters[name](base)

    # Assignments never reach the property: nn.Module.__setattr__ handles registered parameter names itself.
    return property(get, doc=f"`{name}` plus its LoRA update")


class LoraMultiheadAttention(nn.MultiheadAttention, WeightLora):
    """nn.MultiheadAttention whose in-projection weights (read by its forward, never called) include LoRA."""

    _lora_base = nn.MultiheadAttention
    in_proj_weight = _adapted_weight("in_proj_weight")
    q_proj_weight = _adapted_weight("q_proj_weight")
    k_proj_weight = _adapted_weight("k_proj_weight")
    v_proj_weight = _adapted_weight("v_proj_weight")


class LoraReadLinear(nn.Linear, WeightLora):
    """nn.Linear whose `weight` includes LoRA: for owners that read it instead of calling the module."""

    _lora_base = nn.Linear
    weight = _adapted_weight("weight")


class LoraReadOutProj(NonDynamicallyQuantizableLinear, WeightLora):
    """nn.MultiheadAttention's out_proj, whose weight the attention reads directly, with LoRA."""

    _lora_base = NonDynamicallyQuantizableLinear
    weight = _adapted_weight("weight")


_ADAPTED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.MultiheadAttention: LoraMultiheadAttention,
    nn.Linear: LoraReadLinear,
    NonDynamicallyQuantizableLinear: LoraReadOutProj,
}


def _adapted_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _ADAPTED_CLASSES:  # a subclass of one of the above: the same properties, on a class of its own
        names = _IN_PROJ if issubclass(cls, nn.MultiheadAttention) else ("weight",)
        body = {"_lora_base": cls, **{n: _adapted_weight(n) for n in names}}
        new = type(f"Lora{cls.__name__}", (cls, WeightLora), body)
        new.__module__, new.__qualname__ = __name__, f"Lora{cls.__name__}_{len(_ADAPTED_CLASSES)}"
        globals()[new.__qualname__] = new  # findable by name, so pickling works
        _ADAPTED_CLASSES[cls] = new
    return _ADAPTED_CLASSES[cls]


def _add_weight_lora(module: nn.Module, blocks: dict[str, int], rank: int, scale: float) -> None:
    """Give `module` weight-space adapters on the named weights (name -> number of stacked projections)."""
    deltas = {n: LoraDelta(module._parameters[n].detach(), rank, scale, b) for n, b in blocks.items()}
    module.__class__ = _adapted_class(type(module))
    setattr(module, _ADAPTERS, nn.ModuleDict(deltas))


# ---------------------------------------------------------------------------------------------------------------
# Choosing the modules


def matches(name: str, pattern: str) -> bool:
    """Whether the pattern's dotted components occur as consecutive whole components of the module name."""
    parts, want = name.split("."), pattern.strip(".").split(".")
    return any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def _module_tower(model: ClipModel, name: str, module: nn.Module) -> Tower | None:
    towers = {model.tower_of(f"{name}.{p}" if name else p) for p, _ in module.named_parameters()}
    return towers.pop() if len(towers) == 1 else None


def _check_config(cfg: LoraConfig) -> None:
    if cfg.alpha <= 0:
        raise ValueError(f"finetune.lora.alpha: {cfg.alpha!r} must be > 0")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"finetune.lora.dropout: {cfg.dropout!r} must be in [0, 1)")
    if not cfg.towers or any(t not in ENCODERS for t in cfg.towers):
        raise ValueError(f"finetune.lora.towers: {cfg.towers!r}; use a non-empty list of {', '.join(ENCODERS)}")
    if any(not str(t).strip(". ") for t in cfg.targets):
        raise ValueError(f"{_TARGETS_KEY}: {cfg.targets!r}; give module-name patterns such as attn, mlp")


def targets(model: ClipModel, cfg: LoraConfig) -> list[str]:
    """The module-name patterns that get adapters: `finetune.lora.targets`, or where empty the model's own."""
    return list(cfg.targets) or list(model.lora_targets())


def _plan(model: ClipModel, cfg: LoraConfig) -> tuple[dict[str, Tower], dict[str, Tower], dict[str, Tower]]:
    """(peft Linear targets, whole MHAs, weight-read Linears), each module name -> its tower."""
    patterns = targets(model, cfg)
    readers = model.weight_readers()
    modules = dict(model.named_modules())
    linear: dict[str, Tower] = {}
    mha: dict[str, Tower] = {}
    read: dict[str, Tower] = {}
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.MultiheadAttention)) or not any(matches(name, p) for p in patterns):
            continue
        tower = _module_tower(model, name, module)
        if tower not in cfg.towers:
            continue
        parent_name = name.rpartition(".")[0]
        if isinstance(module, nn.MultiheadAttention):
            mha[name] = tower
        elif parent_name in mha:
            continue  # out_proj of an MHA adapted as a whole
        elif isinstance(modules.get(parent_name), readers):
            read[name] = tower
        else:
            linear[name] = tower
    return linear, mha, read


def _no_match(model: ClipModel, cfg: LoraConfig) -> ValueError:
    examples: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.MultiheadAttention)) and _module_tower(model, name, module) in cfg.towers:
            examples.setdefault(re.sub(r"\.\d+(?=\.|$)", ".N", name), name)  # one example per repeated block
    listed = ", ".join(list(examples.values())[:8]) or "(none: these towers have no Linear or attention layers)"
    return ValueError(
        f"{_TARGETS_KEY}: {targets(model, cfg)!r} matched no nn.Linear or nn.MultiheadAttention in the "
        f"{' and '.join(cfg.towers)} tower(s); patterns match whole dotted name components. "
        f"Modules there include: {listed}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Public API


def apply_lora(model: ClipModel, cfg: LoraConfig) -> list[str]:
    """Inject adapters into the matched projections of `cfg.towers`; return the adapted module names.

    An adapted `nn.MultiheadAttention` is listed once (its q/k/v in-projection and out_proj both get adapters).
    rank 0 (LoRA off) changes nothing and returns []. A requested tower with no match is left as it is (with a
    warning); nothing matched at all raises ValueError. Afterwards every original parameter of a tower that got
    adapters is frozen, adapters are trainable, and every other parameter keeps its requires_grad.
    """
    if cfg.rank <= 0:
        return []
    _check_config(cfg)
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters: merge_lora it first, or build a fresh model")
    linear, mha, read = _plan(model, cfg)
    adapted = {**linear, **mha, **read}
    if not adapted:
        raise _no_match(model, cfg)

    flags = {id(p): p.requires_grad for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    scale = cfg.alpha / cfg.rank
    if linear:
        _inject_peft(model, sorted(linear), cfg)
    for name in mha:
        attn = model.get_submodule(name)
        in_proj = {n: 3 if n == "in_proj_weight" else 1 for n in _IN_PROJ if attn._parameters.get(n) is not None}
        _add_weight_lora(attn, in_proj, cfg.rank, scale)
        _add_weight_lora(attn.out_proj, {"weight": 1}, cfg.rank, scale)
    for name in read:
        _add_weight_lora(model.get_submodule(name), {"weight": 1}, cfg.rank, scale)
    if (mha or read) and cfg.dropout > 0:
        log.warning(
            "finetune.lora.dropout=%s applies to the nn.Linear adapters only, not to the %d attention modules "
            "whose projection weights are read directly (their adapters live in weight space)",
            cfg.dropout,
            len(mha) + len(read),
        )

    towers = set(adapted.values())
    for name, param in model.named_parameters():
        if id(param) not in flags:  # created by the injection
            param.requires_grad_(any(part.startswith(ADAPTER_PREFIX) for part in name.split(".")))
        elif model.tower_of(names[id(param)]) in towers:
            param.requires_grad_(False)
        else:  # peft froze it; outside the adapted towers nothing changes
            param.requires_grad_(flags[id(param)])
    for tower in cfg.towers:
        if tower not in towers:
            log.warning(
                "%s: nothing matched in the %s tower; it is left as it is (lock it to freeze it)", _TARGETS_KEY, tower
            )
    counts = {t: sum(v == t for v in adapted.values()) for t in sorted(towers)}
    log.info("LoRA rank %d on %s", cfg.rank, ", ".join(f"{n} {t} modules" for t, n in counts.items()))
    return sorted(adapted)


def _inject_peft(model: ClipModel, names: list[str], cfg: LoraConfig) -> None:
    # A regex string is matched with re.fullmatch on every module name: exactly these modules, no suffix matching.
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="|".join(re.escape(n) for n in names),
        bias="none",
        init_lora_weights=True,
    )
    inject_adapter_in_model(peft_cfg, model)
    if "peft_config" in model.__dict__:
        del model.peft_config


def has_lora(model: nn.Module) -> bool:
    """Whether the model holds LoRA adapters (of either kind) that are not merged yet."""
    return any(isinstance(m, (LoraLayer, WeightLora)) for m in model.modules())


def merge_lora(model: ClipModel) -> ClipModel:
    """Fold every adapter into its weight (W + scale * B @ A) and remove it, in place; returns the model.

    The state dict then has exactly the original model's keys. Merged weights keep their requires_grad (frozen).
    """
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for module in [m for m in model.modules() if isinstance(m, WeightLora)]:
        with torch.no_grad():
            for name, delta in getattr(module, _ADAPTERS).items():
                base = module._parameters[name]
                base.copy_(delta(base))  # in place: the same Parameter object, key and position
        delattr(module, _ADAPTERS)
        module.__class__ = module._lora_base
    return model


def _is_adapter_key(key: str) -> bool:
    return any(part.startswith(ADAPTER_PREFIX) for part in key.split("."))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (copies), keyed as in `model.state_dict()`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if _is_adapter_key(k)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into a model that `apply_lora` adapted with the same targets, towers and rank."""
    expected = {k for k in model.state_dict() if _is_adapter_key(k)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            "LoRA state does not fit this model's adapters (apply_lora with the same finetune.lora targets and "
            f"towers first): missing {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} ({len(unexpected)})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: another rank
        raise ValueError(f"LoRA state does not fit this model's adapters (different finetune.lora.rank?): {e}") from e


def scale_lora(model: nn.Module, factor: float) -> None:
    """Multiply every adapter's update by `factor`, in place (B *= factor): factor 0 gives the base model.

    WiSE-FT with LoRA: load the fine-tuned adapters, `scale_lora(model, alpha)`, evaluate or `merge_lora`.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name.split("."):
                param.mul_(factor)
