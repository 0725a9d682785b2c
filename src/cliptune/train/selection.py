"""Which evaluation's weights a run keeps (train.select) and when it stops early (train.early_stopping).

The rules follow Lightning's `ModelCheckpoint` and `EarlyStopping`: the best weights are those of the strictly best
value of the selection metric; early stopping counts evaluations whose value did not beat its own reference by more
than `min_delta`, and stops after `patience` of them in a row. Only evaluations after training started compete; the
baseline (step 0) is reported beside them. A NaN value never counts as an improvement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cliptune.config import ConfigError, RunConfig
from cliptune.train.logging import epoch_text

Results = dict[str, dict[str, float]]


@dataclass
class Point:
    """One evaluation of the selection metric; `epoch` as every record counts it (`logging.epoch_at`)."""

    epoch: float
    step: int
    value: float


def default_metric(cfg: RunConfig, validation: list[tuple[str, str]]) -> str | None:
    """The first validation set's headline metric, else the first retrieval set's mean_recall, else the first
    zero-shot set's acc1; None when the run evaluates nothing that could select. `validation` is (name, kind)."""
    headline = {"retrieval": "mean_recall", "zeroshot": "acc1"}
    if validation:
        name, kind = validation[0]
        return f"{name}/{headline[kind]}"
    if cfg.eval.retrieval:
        return f"{cfg.eval.retrieval[0].name}/mean_recall"
    if cfg.eval.zeroshot:
        return f"{cfg.eval.zeroshot[0].name}/acc1"
    return None


class Selection:
    """The best and last value of the selection metric, and the early-stopping count; saved in checkpoints."""

    def __init__(self, metric: str, mode: str, patience: int | None = None, min_delta: float = 0.0) -> None:
        self.metric, self.mode = metric, mode
        self.set_name, self.metric_name = metric.split("/")
        self.patience, self.min_delta = patience, min_delta
        self.best: Point | None = None
        self.last: Point | None = None
        self.reference: float | None = None  # early stopping's own best (moves only by more than min_delta)
        self.bad_evaluations = 0
        self.stopped: dict[str, Any] | None = None

    def value(self, results: Results) -> float:
        """The selection metric in `results`; a clear error naming what exists when it is not there."""
        if self.set_name not in results:
            raise ConfigError(f"train.select.metric: {self.metric!r}: no eval set {self.set_name!r}; {sorted(results)}")
        values = results[self.set_name]
        if self.metric_name not in values:
            raise ConfigError(
                f"train.select.metric: {self.metric!r}: set {self.set_name!r} has no metric {self.metric_name!r}; "
                f"it has {', '.join(sorted(values))}"
            )
        return float(values[self.metric_name])

    def _beats(self, value: float, reference: float | None, margin: float) -> bool:
        if math.isnan(value):
            return False
        if reference is None:
            return True
        return value > reference + margin if self.mode == "max" else value < reference - margin

    def update(self, results: Results, epoch: float, step: int) -> bool:
        """Record one evaluation; True when it is the new best (its weights should be kept)."""
        value = self.value(results)
        self.last = Point(epoch, step, value)
        improved = self._beats(value, self.best.value if self.best else None, 0.0)
        if improved:
            self.best = Point(epoch, step, value)
        if self._beats(value, self.reference, self.min_delta):
            self.reference, self.bad_evaluations = value, 0
        else:
            self.bad_evaluations += 1
        if self.patience is not None and self.bad_evaluations >= self.patience:
            self.stopped = {
                "epoch": epoch,
                "step": step,
                "reason": f"{self.metric} did not improve by more than {self.min_delta:g} in {self.patience} "
                f"evaluation(s) in a row (best {self.best.value:.4g} at epoch {epoch_text(self.best.epoch)}, step "
                f"{self.best.step})"
                if self.best
                else f"{self.metric} was NaN in {self.patience} evaluation(s) in a row",
            }
        return improved

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON data: where the best and last evaluations were, and the early-stopping count."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": asdict(self.best) if self.best else None,
            "last": asdict(self.last) if self.last else None,
            "reference": self.reference,
            "bad_evaluations": self.bad_evaluations,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = Point(**state["best"]) if state.get("best") else None
        self.last = Point(**state["last"]) if state.get("last") else None
        self.reference, self.bad_evaluations = state.get("reference"), state.get("bad_evaluations", 0)
        self.stopped = state.get("stopped")


def build_selection(cfg: RunConfig, validation: list[tuple[str, str]]) -> Selection | None:
    metric = cfg.train.select.metric or default_metric(cfg, validation)
    if metric is None:
        if cfg.train.early_stopping is not None:
            raise ConfigError("train.early_stopping: needs an eval set to watch (eval.validation or eval.retrieval)")
        return None
    stop = cfg.train.early_stopping
    return Selection(metric, cfg.train.select.mode, stop.patience if stop else None, stop.min_delta if stop else 0.0)
