"""The runs of an output folder: each run's status (status.json, written here alone), `cliptune runs`' table and
`--compare`'s side-by-side metrics and config differences."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliptune import config as config_mod
from cliptune.train.logging import METRICS_FILE, TRAIN_LOG_FILE, epoch_text
from cliptune.utils.files import atomic_write

STATUS_FILE = "status.json"
DONE, RUNNING, INTERRUPTED, FAILED = "done", "running", "interrupted", "failed"
PRUNED = "pruned"  # a sweep trial stopped by the pruner


# ---------------------------------------------------------------------------------------------------------------
# status.json: one entry per session (start, end, outcome)


def _read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"sessions": []}


def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
    with atomic_write(run_dir / STATUS_FILE) as tmp:
        tmp.write_text(json.dumps(status, indent=2))


def session_started(run_dir: Path) -> None:
    status = _read_status(run_dir)
    status["sessions"].append({"started": time.time(), "ended": None, "pid": os.getpid(), "status": RUNNING})
    status["status"] = RUNNING
    _write_status(run_dir, status)


def session_ended(run_dir: Path, outcome: str, error: str | None = None) -> None:
    """Record how this session ended: done, interrupted (Ctrl-C) or failed (with the error's message)."""
    status = _read_status(run_dir)
    if not status["sessions"]:
        return
    status["sessions"][-1].update(ended=time.time(), status=outcome, error=error)
    status["status"], status["error"] = outcome, error
    _write_status(run_dir, status)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds that id
        return True
    return True


def run_status(run_dir: Path) -> tuple[str, float | None]:
    """(done / running / interrupted / failed, minutes of training over all sessions)."""
    status = _read_status(run_dir)
    sessions = status["sessions"]
    outcome = status.get("status")
    last_write = max(
        (p.stat().st_mtime for p in (run_dir / METRICS_FILE, run_dir / TRAIN_LOG_FILE) if p.exists()), default=None
    )
    seconds = 0.0
    for session in sessions:
        end = session["ended"] or last_write or session["started"]
        seconds += max(0.0, end - session["started"])
    if outcome == RUNNING and not _alive(sessions[-1]["pid"]):
        outcome = INTERRUPTED  # killed: no chance to say so
    if outcome is None:  # a run from before status.json existed
        outcome = DONE if (run_dir / "results.json").is_file() else INTERRUPTED
    return outcome, (seconds / 60 if sessions else None)


# ---------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class RunRow:
    name: str
    model: str
    strategy: str
    objective: str
    epochs: str
    selected: str
    last: str
    minutes: str
    status: str


COLUMNS = ("name", "model", "strategy", "objective", "epochs", "selected", "last", "minutes", "status")


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file()


def find_runs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; give the output folder of your runs (runtime.output_dir)")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and is_run(p))


def _config(run_dir: Path) -> dict[str, Any]:
    try:
        return config_mod.to_dict(config_mod.load(run_dir / "config.yaml"))
    except (ValueError, OSError):
        return {}


def describe_model(model: dict[str, Any]) -> str:
    if model.get("preset"):
        return model["preset"]
    if model.get("backend") == "composed":
        return f"{model['image_tower']['name']} + {model['text_tower']['name']}"
    tag = model.get("pretrained")
    return f"{model.get('arch')}:{tag}" if tag else str(model.get("arch"))


def describe_strategy(finetune: dict[str, Any]) -> str:
    """The fine-tuning strategy in a few words, e.g. `lock image+text, heads linear, ema 0.999`."""
    parts = []
    locked = [t for t in ("image", "text") if finetune.get(f"lock_{t}")]
    partial = [t for t in ("image", "text") if finetune.get(f"lock_{t}_patterns")]
    if locked:
        parts.append("lock " + "+".join(locked))
    if partial:
        parts.append("partial lock " + "+".join(partial))
    if finetune.get("heads", "none") != "none":
        parts.append(f"heads {finetune['heads']}")
    if finetune.get("lora", {}).get("rank"):
        parts.append(f"lora r{finetune['lora']['rank']}")
    if finetune.get("prompt_tokens"):
        parts.append(f"prompts {finetune['prompt_tokens']}")
    if finetune.get("ema_decay"):
        parts.append(f"ema {finetune['ema_decay']:g}")
    return ", ".join(parts) or "full"


def _point(point: dict[str, Any] | None) -> str:
    return "" if not point else f"{point['value']:.2f} (e{epoch_text(point['epoch'])} s{point['step']})"


def _progress(run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, float | None]:
    """(selected, last, epochs done) from results.json, or from the newest checkpoint of an unfinished run."""
    results = run_dir / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        sel = data.get("selection") or {}
        return sel.get("best"), sel.get("last"), data.get("run", {}).get("epochs")
    best = run_dir / "checkpoints" / "best" / "best.json"
    record = json.loads(best.read_text()) if best.is_file() else None
    selected = None
    if record:
        metric_set, metric = record["metric"].split("/")
        value = record["results"].get(metric_set, {}).get(metric)
        selected = {"epoch": record["epoch"], "step": record["step"], "value": value} if value is not None else None
    return selected, None, None


def run_row(run_dir: Path) -> RunRow:
    cfg = _config(run_dir)
    status, minutes = run_status(run_dir)
    selected, last, epochs_done = _progress(run_dir)
    total = cfg.get("train", {}).get("epochs")
    epochs = f"{epoch_text(epochs_done)}/{total}" if epochs_done is not None else f"?/{total}"
    metric = (cfg.get("train", {}).get("select") or {}).get("metric") or ""
    return RunRow(
        name=run_dir.name,
        model=describe_model(cfg.get("model", {})),
        strategy=describe_strategy(cfg.get("finetune", {})),
        objective=cfg.get("loss", {}).get("name", ""),
        epochs=epochs,
        selected=(f"{metric} " if metric else "") + _point(selected),
        last=_point(last),
        minutes="" if minutes is None else f"{minutes:.1f}",
        status=status,
    )


def render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows])


def runs_table(folder: Path, markdown: bool = False) -> str:
    rows = [run_row(p) for p in find_runs(folder)]
    if not rows:
        return f"no runs in {folder}"
    return render(list(COLUMNS), [[getattr(r, c) for c in COLUMNS] for r in rows], markdown)


# ---------------------------------------------------------------------------------------------------------------
# --compare


def _resolve(folder: Path, name: str) -> Path:
    for candidate in (Path(name), folder / name):
        if candidate.is_dir() and is_run(candidate):
            return candidate
    raise FileNotFoundError(
        f"{name}: not a run directory (looked in . and {folder}); `cliptune runs {folder}` lists them"
    )


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def compare(folder: Path, names: list[str], markdown: bool = False) -> str:
    """Final (selected) metrics of each run side by side, then the config keys in which the runs differ."""
    dirs = [_resolve(folder, n) for n in names]
    results = [json.loads((d / "results.json").read_text()) if (d / "results.json").is_file() else {} for d in dirs]
    keys = list(dict.fromkeys((s, m) for r in results for s, ms in r.get("final", {}).items() for m in ms))
    header = ["metric", *[d.name for d in dirs]]
    rows = [[f"{s}/{m}", *[_cell(r.get("final", {}).get(s, {}).get(m)) for r in results]] for s, m in keys]
    rows += [["minutes", *[run_row(d).minutes for d in dirs]], ["status", *[run_row(d).status for d in dirs]]]
    configs = [_flat(_config(d)) for d in dirs]
    differ = [k for k in dict.fromkeys(k for c in configs for k in c) if len({repr(c.get(k)) for c in configs}) > 1]
    differ = [k for k in differ if k not in ("name",)]
    text = render(header, rows, markdown)
    if differ:
        cfg_rows = [[k, *[str(c.get(k, "")) for c in configs]] for k in differ]
        text += "\n\n" + render(["config", *[d.name for d in dirs]], cfg_rows, markdown)
    return text


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"
