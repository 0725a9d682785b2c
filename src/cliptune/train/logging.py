"""Where training numbers go: metrics.jsonl (evaluations), train.jsonl (steps), TensorBoard, and the console."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("cliptune")

METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train.jsonl"


def _tensorboard(folder: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # slow import; only a training run needs it

    return SummaryWriter(log_dir=str(folder / "tensorboard"))


class RunLog:
    """Appends evaluation and step records to JSONL files and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.writer = _tensorboard(run_dir)

    def evaluation(self, epoch: int, step: int, results: dict[str, dict[str, float]]) -> None:
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

    def evaluation(self, epoch: int, step: int, results: dict[str, dict[str, float]]) -> None:
        pass

    def train_step(self, record: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, epoch: int) -> None:
    """Drop records past `epoch`: a run killed after logging but before its checkpoint replays that epoch."""
    records = [r for r in read_jsonl(path) if r["epoch"] <= epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def evaluations(run_dir: Path) -> dict[int, dict[str, dict[str, float]]]:
    """metrics.jsonl regrouped as epoch -> eval name -> metrics."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for rec in read_jsonl(run_dir / METRICS_FILE):
        values = {k: v for k, v in rec.items() if k not in ("epoch", "step", "eval")}
        out.setdefault(rec["epoch"], {})[rec["eval"]] = values
    return out
