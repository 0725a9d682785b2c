"""`cliptune sweep`: a hyperparameter search with Optuna over the keys of a run config.

Optuna does the search (TPE sampler), the pruning (median pruner on each trial's evaluations, after a warm-up of
`--startup-trials` finished trials and `--warmup-evals` evaluations in each trial) and the bookkeeping
(the study lives in `study.db`, SQLite, inside the sweep folder, so a killed sweep continues where it stopped).
This module only turns a SPACE file into suggestions, a trial into a run, and the study into reports: `sweep.md`
and `sweep.csv` (trials by objective), `param_KEY.png` (objective against each parameter) and `best.yaml`.

The sweep folder is `{runtime.output_dir}/{name}-sweep`; trial N is the run `trial_N` in it (`cliptune runs` lists
them). Trials share the locked-tower feature cache (`runtime.feature_cache`, by default `feature_cache/` there).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cliptune import config as config_mod
from cliptune.config import ConfigError, RunConfig
from cliptune.utils.files import atomic_write

log = logging.getLogger("cliptune")

STUDY_FILE = "study.db"
STUDY_NAME = "cliptune"
_RANGES = ("log_uniform", "uniform", "int")
PRUNED_STEP, PRUNED_EPOCH = "pruned_step", "pruned_epoch"  # a pruned trial's user attributes: where it stopped
# A trial's first evaluation never prunes: it is taken during or just after the learning-rate warm-up, where a good
# setting (a lower peak rate, a longer warm-up) is often still behind a bad one.
WARMUP_EVALS = 1


@dataclass
class Param:
    """One searched config key: a range (`log_uniform`, `uniform`, `int`) or a list of choices."""

    key: str
    kind: str  # log_uniform, uniform, int or choice
    values: list[Any]

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.values)
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, int(low), int(high))
        return trial.suggest_float(self.key, float(low), float(high), log=self.kind == "log_uniform")


def read_space(path: str | Path) -> list[Param]:
    """SPACE.yaml: `config.key: {log_uniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{int: [lo, hi]}` or `[a, b, ...]`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: a mapping of config keys to ranges, e.g. `optim.lr: {{log_uniform: [1e-5, 1e-3]}}`")
    known = {key for key, *_ in config_mod.describe()}
    return [_param(path, key, spec, known) for key, spec in data.items()]


def _param(path: Path, key: str, spec: Any, known: set[str]) -> Param:
    if key not in known:
        raise ConfigError(f"{path}: {key!r} is not a config key (`cliptune config` lists them)")
    if isinstance(spec, list) and spec:
        return Param(key, "choice", spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), *_ = spec.items()
        ok = kind in _RANGES and isinstance(bounds, list) and len(bounds) == 2
        if ok and all(isinstance(b, (int, float, str)) for b in bounds):
            low, high = (float(b) for b in bounds)
            if low < high and (kind != "log_uniform" or low > 0):
                return Param(key, kind, [low, high])
    raise ConfigError(
        f"{path}: {key}: {spec!r} is not a range or a list of choices; write {{log_uniform: [lo, hi]}} (lo > 0), "
        "{uniform: [lo, hi]}, {int: [lo, hi]} or [choice, choice, ...]"
    )


def _nested(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in params.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def sweep_folder(base: RunConfig) -> Path:
    return Path(base.runtime.output_dir) / f"{base.name}-sweep"


def trial_config(base: RunConfig, folder: Path, number: int, params: dict[str, Any]) -> RunConfig:
    data = config_mod.merge(config_mod.to_dict(base), _nested(params))
    data["name"] = f"trial_{number:03d}"
    data["runtime"]["output_dir"] = str(folder)
    return config_mod.build(data)


# ---------------------------------------------------------------------------------------------------------------
# The study


def _study(folder: Path, direction: str, startup_trials: int, warmup_evals: int = WARMUP_EVALS) -> Any:
    """The study in `folder` (created or continued). The median pruner waits for `startup_trials` finished trials,
    and never prunes a trial at its first `warmup_evals` evaluations."""
    import optuna

    storage = f"sqlite:///{folder / STUDY_FILE}"
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        load_if_exists=True,
        direction="maximize" if direction == "max" else "minimize",
        # Optuna prunes from step n_warmup_steps on, and a trial's steps are its evaluations 1, 2, ... (`_Reporter`).
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_evals + 1),
    )
    # Seeded by the trials already there: a new sweep is reproducible, and a resumed one does not draw its first
    # (random start-up) parameters again from seed 0, which would repeat the trials of the first session.
    study.sampler = optuna.samplers.TPESampler(seed=len(study.get_trials(deepcopy=False)))
    return study


def _retry_killed(study: Any) -> None:
    """Trials still RUNNING belong to a killed sweep (one process runs a sweep folder): fail them, queue them again."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        log.warning("sweep: trial %d was cut off by a killed sweep; its parameters are queued again", trial.number)


class _Reporter:
    """The callback a trial's run calls at each epoch's end and after each mid-epoch evaluation (`eval.every_steps`):
    report every new evaluation to Optuna and prune when told.

    Optuna's step is the evaluation's number in the trial (1, 2, ...), not the training step: the median pruner
    compares trials at the same step, and trials whose batch size differs reach the same evaluation at different
    training steps. Where a trial is pruned (training step and epoch) is kept in the trial's user attributes.
    """

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.reported: set[int] = set()  # training steps already reported

    def __call__(self, trainer: Any) -> None:
        import optuna

        last = trainer.selection.last if trainer.selection is not None else None
        if last is None or last.step in self.reported:
            return
        self.reported.add(last.step)
        self.trial.report(last.value, len(self.reported))
        if self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_STEP, last.step)
            self.trial.set_user_attr(PRUNED_EPOCH, trainer.logged_epoch)
            raise optuna.TrialPruned(
                f"pruned at step {last.step} (evaluation {len(self.reported)}): {trainer.selection.metric} "
                f"{last.value:.4g} is worse than the median of the earlier trials there"
            )


def _objective(base: RunConfig, folder: Path, space: list[Param]) -> Any:
    import optuna

    from cliptune.train.loop import run_training
    from cliptune.train.runs import PRUNED, session_ended

    def objective(trial: optuna.Trial) -> float:
        params = {p.key: p.suggest(trial) for p in space}
        cfg = trial_config(base, folder, trial.number, params)
        log.info("sweep: trial %d: %s", trial.number, params)
        try:
            results = run_training(cfg, callbacks=(_Reporter(trial),))
        except optuna.TrialPruned as pruned:
            session_ended(cfg.run_dir, PRUNED, str(pruned))
            log.info("sweep: trial %d %s", trial.number, pruned)
            raise
        best = (results.get("selection") or {}).get("best")
        if best is None:
            raise ConfigError("sweep: the trial has no selection metric; give the config an eval set")
        return best["value"]

    return objective


def _pruning(trials: int, startup_trials: int | None, warmup_evals: int | None) -> tuple[int, int]:
    """(finished trials before pruning, evaluations of a trial before it can be pruned), defaults filled in."""
    startup_trials = max(1, min(5, trials // 3)) if startup_trials is None else startup_trials
    warmup_evals = WARMUP_EVALS if warmup_evals is None else warmup_evals
    for flag, value in (("--startup-trials", startup_trials), ("--warmup-evals", warmup_evals)):
        if value < 0:
            raise ConfigError(f"sweep: {flag} {value} must be >= 0")
    return startup_trials, warmup_evals


def run_sweep(
    config: str | Path,
    space: str | Path,
    trials: int = 20,
    timeout_min: float | None = None,
    overrides: list[str] | None = None,
    startup_trials: int | None = None,
    warmup_evals: int | None = None,
) -> dict[str, Any]:
    """Run (or continue) the sweep until `trials` trials have finished or `timeout_min` minutes have passed.

    Pruning starts once `startup_trials` trials have finished (default: a third of `trials`, 1 to 5) and never
    stops a trial at its first `warmup_evals` evaluations (default WARMUP_EVALS; `--startup-trials`, `--warmup-evals`).
    """
    from optuna.trial import TrialState

    from cliptune.train.logging import console_logging

    console_logging()
    base = config_mod.resolve_config(config, overrides)
    params = read_space(space)
    startup_trials, warmup_evals = _pruning(trials, startup_trials, warmup_evals)
    evaluated = base.eval.validation or base.eval.retrieval or base.eval.zeroshot or base.data.validation_split
    if not evaluated:
        raise ConfigError("sweep: trials are compared on train.select's metric; give the config an eval set")
    folder = sweep_folder(base)
    folder.mkdir(parents=True, exist_ok=True)
    if base.runtime.feature_cache is None:  # trials share locked-tower outputs
        shared = {"runtime": {"feature_cache": str(folder / "feature_cache")}}
        base = config_mod.build(config_mod.merge(config_mod.to_dict(base), shared))
    study = _study(folder, base.train.select.mode, startup_trials, warmup_evals)
    _retry_killed(study)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    left = trials - len(study.get_trials(deepcopy=False, states=finished))
    if left > 0:
        study.optimize(
            _objective(base, folder, params),
            n_trials=left,
            timeout=timeout_min * 60 if timeout_min else None,
            catch=(FloatingPointError,),
            callbacks=[lambda s, _: write_reports(s, folder, params)],
            gc_after_trial=True,
        )
    return write_reports(study, folder, params)


# ---------------------------------------------------------------------------------------------------------------
# Reports


def _rows(study: Any, params: list[Param]) -> list[dict[str, Any]]:
    """Every trial, finished ones by objective (best first), then pruned ones by their last value, then the rest."""
    from optuna.trial import TrialState

    sign = -1.0 if study.direction.name == "MAXIMIZE" else 1.0
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        value = t.value if t.state == TrialState.COMPLETE else last
        order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}.get(t.state, 2)
        minutes = (t.datetime_complete - t.datetime_start).total_seconds() / 60 if t.datetime_complete else None
        row = {"trial": t.number, "state": t.state.name.lower(), "value": value, "minutes": minutes}
        row[PRUNED_STEP] = t.user_attrs.get(PRUNED_STEP)
        row.update({p.key: t.params.get(p.key) for p in params})
        rows.append((order, sign * value if value is not None else float("inf"), row))
    return [row for *_, row in sorted(rows, key=lambda r: (r[0], r[1]))]


def _text(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_reports(study: Any, folder: Path, params: list[Param]) -> dict[str, Any]:
    """sweep.md, sweep.csv, param_KEY.png and best.yaml (when a trial has finished); the best trial's facts."""
    rows = _rows(study, params)
    header = ["trial", "state", "value", "minutes", PRUNED_STEP, *[p.key for p in params]]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(folder / "sweep.csv") as tmp:
        tmp.write_text(out.getvalue())
    for param in params:
        plot_param(rows, param, folder / f"param_{param.key}.png")
    best = _best(study, folder)
    lines = [f"# Sweep {folder.name}", "", _headline(study, best), "", _LEGEND, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_text(r[h]) for h in header) + " |" for r in rows]
    with atomic_write(folder / "sweep.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return best


_LEGEND = (
    "value: a finished trial's selected evaluation, a pruned trial's last one; pruned_step: the training step whose "
    "evaluation the median pruner stopped the trial at."
)


def _best(study: Any, folder: Path) -> dict[str, Any]:
    """The best finished trial; best.yaml is its resolved config, named `best`, so `cliptune train` repeats it."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return {"number": None, "value": float("nan"), "metric": "", "folder": str(folder)}
    trial = study.best_trial
    run_config = folder / f"trial_{trial.number:03d}" / "config.yaml"
    cfg = config_mod.load(run_config)
    cfg.name = "best"
    with atomic_write(folder / "best.yaml") as tmp:
        config_mod.dump(cfg, tmp)
    metric = cfg.train.select.metric or _selected_metric(run_config.parent) or "the default selection metric"
    return {"number": trial.number, "value": trial.value, "metric": metric, "folder": str(folder)}


def _selected_metric(run_dir: Path) -> str | None:
    """The metric a finished run selected on (train.select.metric or its default), from its results.json."""
    results = run_dir / "results.json"
    if not results.is_file():
        return None
    return (json.loads(results.read_text()).get("selection") or {}).get("metric")


def _headline(study: Any, best: dict[str, Any]) -> str:
    direction = "higher" if study.direction.name == "MAXIMIZE" else "lower"
    if best["number"] is None:
        return "No trial has finished yet."
    return (
        f"Objective: the selected evaluation's value of {best['metric']} ({direction} is better). Best: trial "
        f"{best['number']}, {best['value']:.4g}; `cliptune train best.yaml` repeats it (run `best` here)."
    )


def plot_param(rows: list[dict[str, Any]], param: Param, path: Path) -> None:
    """Objective against one parameter: finished trials as dots, pruned ones (their last value) as crosses."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    choices = [str(c) for c in param.values] if param.kind == "choice" else None
    for state, marker in (("complete", "o"), ("pruned", "x")):
        points = [(r[param.key], r["value"]) for r in rows if r["state"] == state and r["value"] is not None]
        if choices is not None:
            points = [(choices.index(str(x)), y) for x, y in points]
        if points:
            ax.scatter(*zip(*points), marker=marker, label=state)
    if choices is not None:
        ax.set_xticks(range(len(choices)), choices)
    elif param.kind == "log_uniform":
        ax.set_xscale("log")
    ax.set(title=f"objective against {param.key}", xlabel=param.key, ylabel="objective")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
