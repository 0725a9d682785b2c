"""Where training numbers go: metrics.jsonl (evaluations), train.jsonl (steps), TensorBoard, and the console."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliptune.utils.files import atomic_write

log = logging.getLogger("cliptune")

METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train.jsonl"
EPOCH_DECIMALS = 4


def epoch_at(step: int, steps_per_epoch: int) -> float:
    """The epoch every record carries (train.jsonl, metrics.jsonl, results.json, summary.md, `cliptune runs`):
    optimizer steps done in units of epochs, so 1.5 is halfway through the second epoch and 2.0 its end.

    This is Hugging Face Trainer's `state.epoch`. It is a function of the step alone, so a step record and the
    evaluation at the same step always agree, a resumed run numbers as the uninterrupted one, and at epoch ends it is
    the count of whole epochs done (what epoch-cadence evaluations and `checkpoints/epoch_N/` count)."""
    return round(step / max(steps_per_epoch, 1), EPOCH_DECIMALS)


def epoch_text(epoch: float) -> str:
    """An epoch for people: `2` at an epoch's end, `1.25` inside one."""
    return f"{epoch:.{EPOCH_DECIMALS}f}".rstrip("0").rstrip(".")


def _tensorboard(folder: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # slow import; only a training run needs it

    return SummaryWriter(log_dir=str(folder / "tensorboard"))


class RunLog:
    """Appends evaluation and step records to JSONL files and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.writer = _tensorboard(run_dir)

    def evaluation(self, epoch: float, step: int, results: dict[str, dict[str, float]]) -> None:
        with (self.run_dir / METRICS_FILE).open("a") as f:
            for name, values in results.items():
                f.write(json.dumps({"epoch": epoch, "step": step, "eval": name, **values}) + "\n")
                for metric, value in values.items():
                    self.writer.add_scalar(f"{name}/{metric}", value, step)
        self.writer.flush()

    def train_step(self, record: dict[str, float]) -> None:
        with (self.run_dir / TRAIN_LOG_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch"):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


class SilentLog:
    """The run log of a process other than the main one: only the main process writes files."""

    def evaluation(self, epoch: float, step: int, results: dict[str, dict[str, float]]) -> None:
        pass

    def train_step(self, record: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a run's JSONL log. A last line cut short (a run killed while writing it) is dropped with a
    warning; any other line that is not a JSON record is an error naming the file and the line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines):
            log.warning("%s: line %d is half-written (the run was killed while writing it); dropped", path, number)
        else:
            raise ValueError(
                f"{path}, line {number}: not a JSON record ({line[:60]!r}); remove that line to resume the run"
            )
    return records


def step_losses(run_dir: Path) -> list[float]:
    """The training loss of every logged step; train.jsonl also holds epoch means and validation losses."""
    return [r["loss"] for r in read_jsonl(Path(run_dir) / TRAIN_LOG_FILE) if "loss" in r]


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step`: a run killed after logging but before its checkpoint replays those steps."""
    if not path.is_file():
        return
    records = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


@dataclass
class Evaluation:
    """One evaluation of every eval set at optimizer step `step`, `epoch` = `epoch_at(step)` (0, 0: baseline)."""

    epoch: float
    step: int
    results: dict[str, dict[str, float]] = field(default_factory=dict)


def evaluations(run_dir: Path) -> list[Evaluation]:
    """metrics.jsonl regrouped by evaluation, in step order."""
    out: dict[int, Evaluation] = {}
    for rec in read_jsonl(run_dir / METRICS_FILE):
        values = {k: v for k, v in rec.items() if k not in ("epoch", "step", "eval")}
        out.setdefault(rec["step"], Evaluation(rec["epoch"], rec["step"])).results[rec["eval"]] = values
    return [out[step] for step in sorted(out)]


def console_logging() -> None:
    """Progress lines of the `cliptune` logger on the console at INFO (once: a second call adds nothing)."""
    logger = logging.getLogger("cliptune")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # libraries that call logging.basicConfig would print every line twice
