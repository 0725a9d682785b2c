"""The three calls of the Python API: finetune, load, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cliptune import config as config_mod
from cliptune.config import CompositionalitySpec, RunConfig, TableSpec, ZeroShotSpec, resolve_config
from cliptune.data import read_caption_table, read_classification
from cliptune.data.errors import DataError
from cliptune.eval import Encoding, EvalSuite
from cliptune.inference import Encoder, load, load_any
from cliptune.models import ClipModel
from cliptune.utils.files import close_folders

DatasetSpec = str | Path | dict[str, Any] | TableSpec | ZeroShotSpec | CompositionalitySpec


def finetune(
    config: str | Path | dict[str, Any] | RunConfig,
    *,
    resume: bool = False,
    overrides: list[str] | None = None,
    callbacks: tuple = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """Fine-tune as the config says; returns results.json's content plus `run_dir`.

    Under torchrun every process calls this; only rank 0 gets the results, the others get just `run_dir`.

    Keyword overrides take nested dicts (`optim={"lr": 1e-4}`) or dotted names (`**{"optim.lr": 1e-4}`);
    `overrides` takes CLI-style `key=value` strings.
    """
    from cliptune.train.logging import console_logging  # training code is only imported by whoever trains
    from cliptune.train.loop import run_training

    console_logging()
    return run_training(resolve_config(config, overrides, **kwargs), resume=resume, callbacks=callbacks)


def is_labelled_images(path: str | Path) -> bool:
    """A class folder or a `path label` .txt list (zero-shot classification); anything else is a caption table."""
    return Path(path).is_dir() or Path(path).suffix == ".txt"


def _dataset(spec: DatasetSpec) -> TableSpec | ZeroShotSpec | CompositionalitySpec:
    if isinstance(spec, (TableSpec, ZeroShotSpec, CompositionalitySpec)):
        return spec
    if not isinstance(spec, dict):
        spec = {"path": str(spec)}
    _check_exists(Path(str(spec.get("path", ""))).expanduser())
    zeroshot = "templates" in spec or "classnames" in spec or is_labelled_images(spec.get("path", ""))
    # the table reader names the supported formats if the file is neither
    kind = ZeroShotSpec if zeroshot else CompositionalitySpec if "negatives_key" in spec else TableSpec
    return config_mod.from_dict(kind, spec, prefix="dataset")


def _check_exists(path: Path) -> None:
    if path.exists():
        return
    close = close_folders(path, files=True)
    hint = f"; close names: {', '.join(str(p) for p in close)}" if close else ""
    raise DataError(
        f"{path}: no such file or folder; a data set is a caption table (.csv, .tsv, .jsonl, .json) or, for "
        f"zero-shot classification, a folder with one sub-folder per class or a `path label` .txt list{hint}"
    )


def evaluate(
    model: Encoder | ClipModel | str | Path, dataset: DatasetSpec, batch_size: int = 64, precision: str | None = None
) -> dict[str, float]:
    """Retrieval metrics for a caption table, zero-shot classification metrics for a labelled image set, or
    compositionality accuracy for a table of true and false captions (a dataset dict with `negatives_key`)."""
    encoder = model if isinstance(model, Encoder) else Encoder(load_any(model))
    encoding = Encoding(encoder.model, precision or encoder.precision, batch_size)
    spec = _dataset(dataset)
    if isinstance(spec, CompositionalitySpec):
        from cliptune.eval import compositionality_table
        from cliptune.eval.compositionality import evaluate_compositionality

        return evaluate_compositionality(encoding, compositionality_table(spec))
    if isinstance(spec, TableSpec):
        suite = EvalSuite(retrieval=[read_caption_table(spec)])
    else:
        suite = EvalSuite(zeroshot=[(read_classification(spec), spec.templates)])
    suite.warn_degenerate()  # one image, or one class: the score means nothing
    (results,) = suite.run(encoding).values()
    return results


__all__ = ["evaluate", "finetune", "load", "resolve_config"]
