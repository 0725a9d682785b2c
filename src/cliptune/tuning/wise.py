"""WiSE-FT: interpolate between the weights a run started from and the fine-tuned ones, sweep alpha, export one.

theta(alpha) = (1 - alpha) * theta_initial + alpha * theta_finetuned over every floating-point tensor; alpha 0 is
the starting (zero-shot) model, alpha 1 the fine-tuned one, and both ends are reproduced bit for bit. Tensors that
are not floating point (integer buffers such as BatchNorm's num_batches_tracked) come from the fine-tuned model.

The trainer writes `initial.safetensors` into the run directory with `save_initial` before the first step. It holds
only what training can change: trainable parameters and the model's buffers. Frozen parameters are identical at both
ends, so their interpolation is themselves and storing them twice would only cost disk (a locked ViT-L tower is most
of the model); `interpolate` takes every tensor absent from the initial state from the fine-tuned model unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cliptune.metrics import headline
from cliptune.models.base import ClipModel
from cliptune.models.io import load_model, save_model
from cliptune.utils.files import atomic_write

log = logging.getLogger("cliptune")

INITIAL_FILE = "initial.safetensors"
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))

Results = dict[str, dict[str, float]]
Evaluate = Callable[[ClipModel], Results]


# ---------------------------------------------------------------------------------------------------------------
# The starting point


def initial_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the tensors training can change: trainable parameters and persistent buffers.

    Call it after locking (requires_grad decides what is trainable). Names are the model's state_dict keys, so a
    tied weight appears under each of its names, as in a saved model.
    """
    keep = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, nn.Parameter) or tensor.requires_grad:
            # contiguous, unshared storage: safetensors refuses anything else
            keep[name] = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
    return keep


def save_initial(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(initial_state(model), str(tmp), metadata={"cliptune": "wise-initial"})
    return path


def load_initial(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---------------------------------------------------------------------------------------------------------------
# Interpolation


def check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"WiSE-FT alpha {alpha!r} must be in [0, 1] (0 = initial weights, 1 = fine-tuned)")
    return float(alpha)


def interpolate(
    initial: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """A full state dict: (1 - alpha) * initial + alpha * finetuned where both have a floating-point tensor,
    the fine-tuned tensor everywhere else. Results have the fine-tuned tensors' dtype and device."""
    alpha = check_alpha(alpha)
    unknown = sorted(set(initial) - set(finetuned))
    if unknown:
        raise ValueError(
            f"initial weights hold {len(unknown)} tensor(s) the fine-tuned model lacks, e.g. {unknown[:3]}: "
            "they come from a different architecture"
        )
    return {name: _mix(name, initial.get(name), tensor, alpha) for name, tensor in finetuned.items()}


def _mix(name: str, start: torch.Tensor | None, end: torch.Tensor, alpha: float) -> torch.Tensor:
    if start is None or not end.is_floating_point():
        return end
    if start.shape != end.shape:
        raise ValueError(f"{name}: initial shape {tuple(start.shape)} != fine-tuned shape {tuple(end.shape)}")
    start = start.to(device=end.device, dtype=end.dtype)
    # The ends are returned as they are, not computed: exact, and safe for infinities (0 * inf is nan).
    if alpha == 0.0:
        return start
    if alpha == 1.0 or torch.equal(start, end):  # unchanged tensors (a locked tower's BatchNorm) stay bit-exact
        return end
    wide = torch.promote_types(end.dtype, torch.float32)  # bf16 arithmetic would round the mix visibly
    return ((1.0 - alpha) * start.to(wide) + alpha * end.to(wide)).to(end.dtype)


@torch.no_grad()
def _assign(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    # In place: the model keeps its parameters (an optimizer or EMA may refer to them), its devices and dtypes.
    live = model.state_dict()
    for name, value in state.items():
        if value.data_ptr() != live[name].data_ptr():  # tensors passed through unchanged need no copy
            live[name].copy_(value)


def apply_alpha(model: nn.Module, initial: dict[str, torch.Tensor], alpha: float) -> None:
    """Set `model`'s weights, in place, to the interpolation at `alpha` between `initial` and its own."""
    _assign(model, interpolate(initial, model.state_dict(), alpha))


def sweep(model: ClipModel, initial: dict[str, torch.Tensor], alphas: Iterable[float], evaluate: Evaluate) -> dict:
    """{alpha: evaluate(model with the interpolated weights)}; afterwards `model` is exactly the fine-tuned model."""
    alphas = [check_alpha(a) for a in alphas]  # all checked before the model is touched
    live = model.state_dict()
    unknown = sorted(set(initial) - set(live))
    if unknown:
        raise ValueError(f"initial weights hold tensor(s) the model lacks, e.g. {unknown[:3]}")
    # Only what interpolation changes needs a backup; every other tensor is never written.
    finetuned = {name: live[name].detach().clone() for name in initial}
    results: dict[float, Results] = {}
    try:
        for alpha in alphas:
            _assign(model, interpolate(initial, finetuned, alpha))
            results[alpha] = evaluate(model)
            log.info("WiSE-FT alpha %.2f: %s", alpha, _headlines(results[alpha]))
    finally:
        _assign(model, finetuned)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _headlines(results: Results) -> str:
    return ", ".join(
        f"{name} {value:.2f}" for name, values in results.items() if (value := headline(values)) is not None
    )


def _sets(results: dict[float, Results]) -> list[str]:
    return list(dict.fromkeys(name for per_alpha in results.values() for name in per_alpha))


def plot_sweep(results: dict[float, Results], path: str | Path) -> Path:
    """PNG: each eval set's headline metric against alpha."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in _sets(results):
        points = [(a, headline(results[a][name])) for a in sorted(results) if name in results[a]]
        points = [(a, v) for a, v in points if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(
        title="WiSE-FT weight interpolation",
        xlabel="alpha (0 = initial, 1 = fine-tuned)",
        ylabel="mean recall / top-1 (%)",
    )
    if results:
        ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def sweep_markdown(results: dict[float, Results]) -> str:
    """A table alpha x eval set of headline metrics; each set's best alpha in bold."""
    sets = _sets(results)
    best = {
        name: max((v for a in results if (v := _cell(results, a, name)) is not None), default=None) for name in sets
    }
    lines = ["| alpha | " + " | ".join(sets) + " |", "|---:|" + "---:|" * len(sets)]
    for alpha in sorted(results):
        cells = []
        for name in sets:
            value = _cell(results, alpha, name)
            text = "" if value is None else f"{value:.2f}"
            cells.append(f"**{text}**" if value is not None and value == best[name] else text)
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(results: dict[float, Results], alpha: float, name: str) -> float | None:
    values = results[alpha].get(name)
    return None if values is None else headline(values)


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_alpha(run_dir: str | Path, alpha: float, out_dir: str | Path) -> Path:
    """Save the run's model at `alpha` as an ordinary model folder that `cliptune.load(out_dir)` reads."""
    return save_model(interpolated_model(run_dir, alpha), out_dir)


def interpolated_model(run_dir: str | Path, alpha: float) -> ClipModel:
    """The run's final model (EMA weights, LoRA merged, as training saved it) at WiSE-FT `alpha`."""
    alpha = check_alpha(alpha)
    run_dir = Path(run_dir)
    initial_path = run_dir / INITIAL_FILE
    if not initial_path.is_file():
        raise ValueError(
            f"{run_dir} has no {INITIAL_FILE}: WiSE-FT needs the weights the run started from, which are written at "
            "the start of training; this run was trained without WiSE-FT support"
        )
    if not (run_dir / "model" / "model.json").is_file():
        raise ValueError(f"{run_dir} has no final model (model/): the run was interrupted; finish it with --resume")
    model = load_model(run_dir / "model")
    _assign(model, interpolate(load_initial(initial_path), model.state_dict(), alpha))
    return model
