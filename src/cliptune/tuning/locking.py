"""Which parameters train: whole-tower locking, then partial-locking patterns (ITRA syntax, repaired).

`finetune.lock_image` / `lock_text` freeze a whole tower. `lock_image_patterns` / `lock_text_patterns` then apply, in
order, a comma-separated list of patterns to that tower's parameters: `name` locks the parameters it matches, `!name`
unlocks them, and a later pattern overrides an earlier one. Seed 000's RN50 recipe reads::

    lock_image: true      lock_image_patterns: "!attnpool,!layer4"
    lock_text: false      lock_text_patterns: "positional_embedding,token_embedding"

Matching rules (ITRA matched raw substrings, so `resblocks.1` also hit `resblocks.10` and `resblocks.11`):

* A parameter's *display name* is its name with the leading wrapper components removed: `module` (DDP), `_orig_mod`
  (torch.compile), and the `containers` each model class declares (`base` for wrappers such as heads, `model` for
  the attribute under which the OpenCLIP and HF backends keep the library model; `models.base.container_names`).
  The backend's own tower prefixes stay (`visual.`, `text_model.`, `vision_model.`, `image_tower.`, `text_tower.`):
  the display name is what `trainable_summary` and the error messages show, e.g. `visual.layer4.0.conv1.weight`
  for OpenCLIP RN50.
* A pattern matches when its dotted components occur as consecutive *whole* components anywhere in the display name:
  `layer4` matches `visual.layer4.0.conv1.weight`, `resblocks.1` matches `transformer.resblocks.1.attn.in_proj_weight`
  but never `resblocks.10.…`, and `ln` never matches `ln_1`. The same wrapper components are stripped from the front
  of a pattern, so a full name copied from `named_parameters()` works as well.
* A pattern acts only on its own tower (`ClipModel.tower_of`); shared parameters (logit_scale, composed heads) are
  never locked by these keys. A pattern that matches nothing in its tower is a `ConfigError` naming the key, the
  pattern and example names: a typo must not silently train everything.

Only what the config mentions changes `requires_grad`: a tower that is neither locked nor patterned is left as it is
(so other strategies may freeze parameters before or after), while `!name` explicitly sets its matches trainable.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cliptune.config import ConfigError, FinetuneConfig
from cliptune.models.base import ENCODERS, TOWERS, ClipModel, Tower, container_names, strip_components

log = logging.getLogger("cliptune")

_MAX_GROUPS = 8  # trainable groups listed per partially locked tower in the summary


# ---------------------------------------------------------------------------------------------------------------
# Names and patterns


def display_name(param_name: str) -> str:
    """The name patterns match and summaries show: `param_name` without leading wrapper components."""
    return strip_components(param_name, container_names())


def _contains_run(parts: list[str], run: tuple[str, ...]) -> bool:
    width = len(run)
    return any(tuple(parts[i : i + width]) == run for i in range(len(parts) - width + 1))


@dataclass(frozen=True)
class Pattern:
    """One entry of a `lock_*_patterns` list."""

    text: str  # as the user wrote it, for messages
    parts: tuple[str, ...]  # dotted components, wrapper prefix stripped
    lock: bool  # False for `!name`

    def matches(self, param_name: str) -> bool:
        return _contains_run(display_name(param_name).split("."), self.parts)


def parse_patterns(value: str, key: str) -> list[Pattern]:
    """The patterns of a comma-separated config value; `key` names the config key in errors."""
    patterns = []
    for raw in value.split(","):
        text = raw.strip()
        if not text:  # tolerate "a, b," and the empty default
            continue
        lock = not text.startswith("!")
        body = text.removeprefix("!").strip()
        parts = body.split(".")
        if not body or any(not p or p != p.strip() or " " in p for p in parts):
            raise ConfigError(
                f"{key}: pattern {text!r} is malformed; write dotted parameter-name components such as "
                "`layer4` or `!transformer.resblocks.11`, separated by commas"
            )
        patterns.append(Pattern(text, tuple(display_name(body).split(".")), lock))
    return patterns


def matches(pattern: str, param_name: str) -> bool:
    """Whether one pattern (without `!`) matches a parameter name under the rules above."""
    return Pattern(pattern, tuple(display_name(pattern).split(".")), True).matches(param_name)


def _no_match_error(model: ClipModel, key: str, pattern: Pattern, tower: Tower, names: list[str]) -> ConfigError:
    shown = [display_name(n) for n in names]
    if not shown:
        return ConfigError(f"{key}: pattern {pattern.text!r} cannot apply: the model has no {tower}-tower parameters")
    elsewhere = {model.tower_of(n) for n, _ in model.named_parameters() if pattern.matches(n)}
    if elsewhere:  # the right name in the wrong key
        where = " and ".join(f"the {t} tower" if t in ENCODERS else "shared parameters" for t in sorted(elsewhere))
        return ConfigError(
            f"{key}: pattern {pattern.text!r} matches no parameter of the {tower} tower, only {where}; patterns act "
            "on their own tower (lock_image_patterns: image, lock_text_patterns: text; shared ones are never locked)"
        )
    components = sorted({c for n in shown for c in n.split(".")})
    close = [c for part in pattern.parts for c in difflib.get_close_matches(part, components, n=3, cutoff=0.6)]
    hint = f" Close components: {', '.join(dict.fromkeys(close))}." if close else ""
    step = max(1, len(shown) // 5)
    examples = ", ".join(shown[::step][:5])
    return ConfigError(
        f"{key}: pattern {pattern.text!r} matches no parameter of the {tower} tower.{hint} Patterns are whole "
        f"dotted components of names such as: {examples}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Locking


def _tower_settings(cfg: FinetuneConfig) -> list[tuple[Tower, bool, str]]:
    return [("image", cfg.lock_image, "lock_image_patterns"), ("text", cfg.lock_text, "lock_text_patterns")]


def _plan_tower(
    model: ClipModel, tower: Tower, whole: bool, key: str, value: str
) -> tuple[dict[str, bool], list[tuple[Pattern, int, int]]]:
    """name -> locked for the parameters the config decides, and (pattern, tensors, elements) for the log."""
    params = model.tower_parameters(tower)
    decided = dict.fromkeys(params, True) if whole else {}
    report = []
    for pattern in parse_patterns(value, f"finetune.{key}"):
        hits = [n for n in params if pattern.matches(n)]
        if not hits:
            raise _no_match_error(model, f"finetune.{key}", pattern, tower, list(params))
        decided.update(dict.fromkeys(hits, pattern.lock))
        report.append((pattern, len(hits), sum(params[n].numel() for n in hits)))
    return decided, report


def apply_locking(model: ClipModel, cfg: FinetuneConfig) -> list[Tower]:
    """Freeze what the config locks; return the towers left with no trainable parameter.

    The trainer runs those towers under no_grad and in eval mode, and may cache their outputs. Every pattern is
    checked before any parameter changes, so a config error leaves the model as it was.
    """
    plans = {
        key: _plan_tower(model, tower, whole, key, getattr(cfg, key)) for tower, whole, key in _tower_settings(cfg)
    }
    params = dict(model.named_parameters())
    for decided, _ in plans.values():
        for name, locked in decided.items():
            params[name].requires_grad_(not locked)
    if any(decided for decided, _ in plans.values()):
        _log_locking(model, plans)
    return fully_locked_towers(model)


def _log_locking(model: ClipModel, plans: dict[str, tuple[dict[str, bool], list[tuple[Pattern, int, int]]]]) -> None:
    for key, (_, report) in plans.items():
        for pattern, tensors, elements in report:
            verb = "locks" if pattern.lock else "unlocks"
            log.info(
                "finetune.%s: %r %s %d tensor(s), %s parameters", key, pattern.text, verb, tensors, f"{elements:,}"
            )
    log.info("trainable parameters after locking:\n%s", trainable_summary(model))


def fully_locked_towers(model: ClipModel) -> list[Tower]:
    """Towers that have parameters, none of them trainable."""
    locked: list[Tower] = []
    for tower in ENCODERS:
        params = list(model.tower_parameters(tower).values())
        if params and not any(p.requires_grad for p in params):
            locked.append(tower)
    return locked


def _partially_locked(model: ClipModel, tower: Tower) -> bool:
    flags = {p.requires_grad for p in model.tower_parameters(tower).values()}
    return flags == {True, False}


def _frozen_batchnorms(root: nn.Module) -> Iterable[_BatchNorm]:
    """BatchNorm modules under `root` whose parameters are all frozen (for affine-free ones: their parent's)."""
    for name, module in root.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        own = list(module.parameters(recurse=False))
        if not own:  # no affine parameters: it belongs to the locked part when the block around it does
            own = list(root.get_submodule(name.rpartition(".")[0]).parameters())
        if not any(p.requires_grad for p in own):
            yield module


def set_train_mode(model: ClipModel, locked: list[Tower]) -> None:
    """model.train(), except that locked parts keep their statistics: fully locked towers go to eval mode, and in a
    partially locked tower every BatchNorm whose parameters are frozen does, so its running statistics never move."""
    model.train()
    for tower in locked:
        for module in model.tower_modules(tower):
            module.eval()
    for tower in ENCODERS:
        if tower in locked or not _partially_locked(model, tower):
            continue
        for root in model.tower_modules(tower):
            for bn in _frozen_batchnorms(root):
                bn.eval()


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def trainable_groups(flags: dict[str, bool]) -> list[str]:
    """The fewest name prefixes that cover exactly the trainable parameters (display name -> trainable)."""
    return _groups([(name.split("."), on) for name, on in flags.items()], [])


def _groups(items: list[tuple[list[str], bool]], prefix: list[str]) -> list[str]:
    if all(on for _, on in items):
        return [".".join(prefix)]
    if not any(on for _, on in items):
        return []
    children: dict[str, list[tuple[list[str], bool]]] = {}
    for parts, on in items:
        children.setdefault(parts[0], []).append((parts[1:], on))
    return [group for head, sub in children.items() for group in _groups(sub, [*prefix, head])]


def trainable_summary(model: ClipModel) -> str:
    """Trainable parameters per tower, as count and share, for the run log; a partially locked tower also lists
    which parameter groups train."""
    lines = []
    for tower in TOWERS:
        params = model.tower_parameters(tower)
        total = sum(p.numel() for p in params.values())
        if not total:
            continue
        lines.append(_line(tower, sum(p.numel() for p in params.values() if p.requires_grad), total))
        if tower != "shared" and _partially_locked(model, tower):
            lines.append(_groups_line({display_name(n): p.requires_grad for n, p in params.items()}))
    everything = list(model.parameters())
    lines.append(
        _line("all", sum(p.numel() for p in everything if p.requires_grad), sum(p.numel() for p in everything))
    )
    return "\n".join(lines)


def _groups_line(flags: dict[str, bool]) -> str:
    groups = trainable_groups(flags)
    more = f", ... (+{len(groups) - _MAX_GROUPS} more)" if len(groups) > _MAX_GROUPS else ""
    return f"         trainable: {', '.join(groups[:_MAX_GROUPS])}{more}"


def _line(tower: str, trainable: int, total: int) -> str:
    return f"  {tower:<6} trainable {trainable:>12,} / {total:>12,} ({100.0 * trainable / total:5.1f}%)"
