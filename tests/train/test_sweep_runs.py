"""`cliptune sweep` (Optuna: pruning, a killed study resumed, reports) and `cliptune runs` (table, --compare, --md)."""

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

import cliptune
from cliptune.cli import main
from cliptune.config import ConfigError
from cliptune.eval import EvalSuite
from cliptune.train import runs, sweep
from tests.helpers import run_config, write_yaml

VALUE = {0.001: 50.0, 0.0001: 10.0, 0.01: 70.0}  # the scripted mean recall of a trial, by its learning rate
LRS = list(VALUE)


@pytest.fixture
def scripted_by_lr(monkeypatch):
    """Each trial's eval set reports the value its learning rate maps to; training and Optuna run for real."""
    current = {}
    real = sweep.trial_config

    def capture(*args, **kwargs):
        cfg = real(*args, **kwargs)
        current["lr"] = cfg.optim.lr
        return cfg

    def run(self, encoding, loss_batch=None):
        return {"val": {"mean_recall": VALUE[current["lr"]]}} if self.retrieval else {}

    monkeypatch.setattr(sweep, "trial_config", capture)
    monkeypatch.setattr(EvalSuite, "run", run)


def _states(folder: Path) -> dict[int, str]:
    with (folder / "sweep.csv").open() as f:
        return {int(r["trial"]): r["state"] for r in csv.DictReader(f)}


@pytest.mark.slow
def test_sweep_prunes_resumes_a_killed_study_and_reports(shapes, tmp_path, scripted_by_lr):
    config = write_yaml(run_config(shapes, tmp_path / "out", epochs=2), tmp_path / "c.yaml")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": LRS}))
    folder = tmp_path / "out" / "run-sweep"
    folder.mkdir(parents=True)
    from optuna.distributions import CategoricalDistribution

    study = sweep._study(folder, "max", startup_trials=1)
    study.enqueue_trial({"optim.lr": 0.001})
    study.enqueue_trial({"optim.lr": 0.0001})  # worse than trial 0 at its first evaluation: pruned
    sweep.run_sweep(config, space, trials=2, startup_trials=1, warmup_evals=0)
    assert _states(folder) == {0: "complete", 1: "pruned"}

    # a sweep killed in the middle of trial 2 leaves it RUNNING in study.db
    study.enqueue_trial({"optim.lr": 0.01})
    killed = study.ask({"optim.lr": CategoricalDistribution(LRS)})
    assert killed.params == {"optim.lr": 0.01}
    best = sweep.run_sweep(config, space, trials=3, startup_trials=1)
    assert _states(folder) == {3: "complete", 0: "complete", 1: "pruned", 2: "fail"}, "trial 2 ran again as 3"
    assert best["number"] == 3 and best["value"] == 70.0

    table = (folder / "sweep.md").read_text()
    assert table.index("| 3 | complete | 70 |") < table.index("| 0 | complete | 50 |") < table.index("| 1 | pruned |")
    assert (folder / "param_optim.lr.png").stat().st_size > 0 and (folder / "study.db").is_file()
    again = yaml.safe_load((folder / "best.yaml").read_text())
    trial = yaml.safe_load((folder / "trial_003" / "config.yaml").read_text())
    assert again == {**trial, "name": "best"} and again["optim"]["lr"] == 0.01
    assert again["runtime"]["feature_cache"] == str(folder / "feature_cache"), "trials share the feature cache"

    listing = runs.runs_table(folder)
    status = {line.split()[0]: line.split()[-1] for line in listing.splitlines()[1:]}
    assert status == {"trial_000": "done", "trial_001": "pruned", "trial_003": "done"}


BY_EVALUATION = {0.001: [30.0, 50.0, 50.0], 0.0001: [40.0, 45.0, 60.0]}  # a trial's values at its evaluations


def _script_evaluations(monkeypatch, by_lr: dict[float, list[float]]) -> None:
    """Each trial's eval set reports `by_lr[its learning rate]`, one value per evaluation after the baseline."""
    current = {}
    real = sweep.trial_config

    def capture(*args, **kwargs):
        cfg = real(*args, **kwargs)
        current.update(lr=cfg.optim.lr, evaluations=0)
        return cfg

    def run(self, encoding, loss_batch=None):
        if not self.retrieval:
            return {}
        values, current["evaluations"] = by_lr[current["lr"]], current["evaluations"] + 1
        return {"val": {"mean_recall": ([0.0, *values])[current["evaluations"] - 1]}}  # the first is the baseline

    monkeypatch.setattr(sweep, "trial_config", capture)
    monkeypatch.setattr(EvalSuite, "run", run)


@pytest.mark.slow
def test_sweep_prunes_at_a_mid_epoch_evaluation(shapes, tmp_path, monkeypatch):
    """With eval.every_steps the pruner sees every evaluation: trial 1's best so far beats trial 0 at step 2 and falls
    below it at step 4, in the middle of its only epoch (6 steps), where it stops; sweep.md and sweep.csv say so."""
    _script_evaluations(monkeypatch, BY_EVALUATION)
    cfg = run_config(shapes, tmp_path / "out", epochs=1, eval__every_steps=2)
    config = write_yaml(cfg, tmp_path / "c.yaml")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": [0.001, 0.0001]}))
    folder = tmp_path / "out" / "run-sweep"
    folder.mkdir(parents=True)
    study = sweep._study(folder, "max", startup_trials=1)
    study.enqueue_trial({"optim.lr": 0.001})
    study.enqueue_trial({"optim.lr": 0.0001})
    sweep.run_sweep(config, space, trials=2, startup_trials=1, warmup_evals=0)

    trials = study.get_trials(deepcopy=False)
    assert [t.intermediate_values for t in trials] == [{1: 30.0, 2: 50.0, 3: 50.0}, {1: 40.0, 2: 45.0}]
    with (folder / "sweep.csv").open() as f:
        rows = {int(r["trial"]): r for r in csv.DictReader(f)}
    assert (rows[0]["state"], rows[0]["pruned_step"]) == ("complete", "")
    assert (rows[1]["state"], rows[1]["value"], rows[1]["pruned_step"]) == ("pruned", "45.0", "4")
    report = (folder / "sweep.md").read_text()
    assert "| 1 | pruned | 45 |" in report and "value of val/mean_recall (higher is better). Best: trial 0" in report
    status = json.loads((folder / "trial_001" / "status.json").read_text())
    assert status["status"] == "pruned" and "pruned at step 4 (evaluation 2)" in status["error"]
    evaluations = map(json.loads, (folder / "trial_001" / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in evaluations] == [0, 2, 4], "the pruned trial stopped at its mid-epoch evaluation"


@pytest.mark.slow
def test_no_trial_is_pruned_during_its_warm_up_evaluations(shapes, tmp_path, monkeypatch, capsys):
    """Trial 1 is below trial 0 at every evaluation (steps 2, 4, 6): the median pruner may stop it from its first
    evaluation on, but `--warmup-evals N` keeps it running through N evaluations (default 1); it stops at the next."""
    _script_evaluations(monkeypatch, {0.001: [50.0, 50.0, 50.0], 0.0001: [10.0, 10.0, 10.0]})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": [0.001, 0.0001]}))
    base = write_yaml(run_config(shapes, tmp_path / "out", epochs=1, eval__every_steps=2), tmp_path / "c.yaml")
    assert main(["sweep", str(base), "--space", str(space), "--warmup-evals", "-1"]) == 2
    assert "sweep: --warmup-evals -1 must be >= 0" in capsys.readouterr().err

    def pruned_trial(name: str, *flags: str) -> tuple[dict, str]:
        study = sweep._study(tmp_path / "out" / f"{name}-sweep", "max", startup_trials=1)
        study.enqueue_trial({"optim.lr": 0.001})
        study.enqueue_trial({"optim.lr": 0.0001})
        args = ["sweep", str(base), f"name={name}", "--space", str(space), "--trials", "2", "--startup-trials", "1"]
        assert main([*args, *flags]) == 0
        first, second = study.get_trials(deepcopy=False)
        assert first.state.name == "COMPLETE" and second.state.name == "PRUNED"
        return second.intermediate_values, second.user_attrs[sweep.PRUNED_STEP]

    (tmp_path / "out" / "default-sweep").mkdir(parents=True)
    assert pruned_trial("default") == ({1: 10.0, 2: 10.0}, 4), "evaluation 1 is the warm-up; pruned at 2 (step 4)"
    (tmp_path / "out" / "two-sweep").mkdir()
    assert pruned_trial("two", "--warmup-evals", "2") == ({1: 10.0, 2: 10.0, 3: 10.0}, 6)


def test_a_resumed_study_draws_new_parameters_and_a_new_one_is_reproducible(tmp_path):
    """Each session opens the study with a new sampler: seeded by the trials already there, it neither repeats the
    first session's draws after a resume nor varies between two fresh sweeps."""
    from optuna.distributions import FloatDistribution

    lr = {"optim.lr": FloatDistribution(1e-5, 1e-2, log=True)}

    def session(folder: Path) -> float:
        folder.mkdir(exist_ok=True)
        study = sweep._study(folder, "max", startup_trials=1)
        trial = study.ask(lr)
        study.tell(trial, 1.0)
        return trial.params["optim.lr"]

    first, resumed = session(tmp_path / "a"), session(tmp_path / "a")
    assert first != resumed, "the resumed sweep drew the first session's parameters again"
    assert session(tmp_path / "b") == first


def test_sweep_space_errors_name_the_key(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lrr: {log_uniform: [1e-5, 1e-3]}\n")
    with pytest.raises(ConfigError, match=r"'optim\.lrr' is not a config key"):
        sweep.read_space(space)
    space.write_text("optim.lr: {log_uniform: [0, 1e-3]}\n")
    with pytest.raises(ConfigError, match="lo > 0"):
        sweep.read_space(space)
    space.write_text("optim.lr: {log_uniform: [1e-5, 1e-3]}\nfinetune.lock_image: [true, false]\n")
    kinds = [(p.key, p.kind) for p in sweep.read_space(space)]
    assert kinds == [("optim.lr", "log_uniform"), ("finetune.lock_image", "choice")]


def _fail(trainer):
    raise RuntimeError("disk on fire")


def _interrupt(trainer):
    raise KeyboardInterrupt


@pytest.mark.slow
def test_runs_table_says_done_interrupted_and_failed(shapes, tmp_path, capsys):
    out = tmp_path / "runs"
    cliptune.finetune(run_config(shapes, out, epochs=1), name="done")
    with pytest.raises(KeyboardInterrupt):
        cliptune.finetune(run_config(shapes, out, epochs=2), name="stopped", callbacks=(_interrupt,))
    with pytest.raises(RuntimeError):
        cliptune.finetune(run_config(shapes, out, epochs=2, optim__lr=2e-3), name="broken", callbacks=(_fail,))
    # a SIGKILLed run: its status still says running, under a process id that no longer exists
    status = json.loads((out / "broken" / "status.json").read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    status["sessions"][-1].update(status="running", ended=None, pid=dead.pid)
    status["status"] = "running"
    (out / "killed").mkdir()
    (out / "killed" / "config.yaml").write_text((out / "broken" / "config.yaml").read_text())
    (out / "killed" / "status.json").write_text(json.dumps(status))

    assert main(["runs", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == list(runs.COLUMNS)
    status_of = {line.split()[0]: line.split()[-1] for line in lines[1:]}
    assert status_of == {"broken": "failed", "done": "done", "killed": "interrupted", "stopped": "interrupted"}
    done = next(line for line in lines if line.startswith("done"))
    assert "1/1" in done and "val/mean_recall" not in done and "cliptune-tiny-vit" in done and "full" in done

    assert main(["runs", str(out), "--compare", "done", str(out / "broken"), "--md"]) == 0
    text = capsys.readouterr().out
    assert "| metric | done | broken |" in text and "| val/mean_recall |" in text
    assert "| optim.lr | 0.001 | 0.002 |" in text and "| train.epochs | 1 | 2 |" in text
    assert main(["runs", str(out), "--compare", "nope"]) == 2
