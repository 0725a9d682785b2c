"""A run folder while a training writes it: one owner (the run lock), no leftovers of killed runs, and a full disk
reported with what it means for the run (the last checkpoint is intact; resume once there is space)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cliptune.config import ConfigError
from cliptune.data import CaptionTable
from cliptune.models.checkpoints import checkpoint_folder, latest_checkpoint
from cliptune.train.logging import log
from cliptune.utils.files import DiskFullError, atomic_write, remove_stale_temporaries
from cliptune.utils.lock import FolderLock


def _main_process() -> bool:
    """Rank 0 of a process group (initialised, or described by torchrun's environment), or the only process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def owned_run(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for one training: a second training into it stops at once with the owner's pid and host."""
    if not _main_process():  # the main process owns the folder for the whole job; the others only read it
        yield
        return
    created = make_run_dir(run_dir)
    try:
        with FolderLock(run_dir):
            clean_leftovers(run_dir)
            try:
                yield
            except DiskFullError as e:
                raise DiskFullError(f"{e}. {checkpoint_note(run_dir)}") from None
    finally:
        for folder in created:  # a run refused before it wrote anything leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def make_run_dir(run_dir: Path) -> list[Path]:
    """Make `run_dir` (and missing parents); return the folders made, deepest first."""
    missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(
            f"runtime.output_dir / name: {run_dir} cannot be a folder, a file is in the way; choose another "
            "runtime.output_dir or `name`"
        ) from None
    except PermissionError:
        raise ConfigError(f"runtime.output_dir: no permission to create {run_dir}; choose a writable folder") from None
    return missing


def clean_leftovers(run_dir: Path) -> None:
    """Remove what killed writers left in the run folder (half-written checkpoints, models, results)."""
    removed, freed = remove_stale_temporaries(run_dir)
    if removed:
        names = ", ".join(str(p.relative_to(run_dir)) for p in removed[:5]) + (", ..." if len(removed) > 5 else "")
        log.warning(
            "%s: removed %d temporaries left by killed runs (%.1f MB): %s", run_dir, len(removed), freed / 1e6, names
        )


def checkpoint_note(run_dir: Path) -> str:
    """What a failed write leaves: checkpoints are written whole or not at all, so the last one is intact."""
    last = latest_checkpoint(checkpoint_folder(run_dir))
    if last is None:
        return "No checkpoint had been written yet, so nothing is lost: free some space and start the run again"
    return (
        f"The previous checkpoint, {last}, is intact: free some space (or raise the limit) and continue with "
        "`cliptune train CONFIG --resume`"
    )


# ---------------------------------------------------------------------------------------------------------------
# Resume integrity: the data a resumed run trains on is the data it started with

DATA_FILE = "train_data.json"


def data_fingerprint(table: CaptionTable) -> dict[str, Any]:
    """Counts and a digest of the training pairs. Paths count relative to their common folder, so a data set moved
    elsewhere as a whole keeps its fingerprint; any edit of an image list or a caption changes it."""
    root = os.path.commonpath([str(p) for p in table.images]) if table.images else ""
    digest = hashlib.sha256()
    for image, captions in zip(table.images, table.captions):
        digest.update(json.dumps([os.path.relpath(image, root) if root else str(image), captions]).encode())
    return {"images": len(table.images), "captions": table.num_captions, "sha256": digest.hexdigest()}


def check_training_data(run_dir: Path, table: CaptionTable | None, resuming: bool) -> None:
    """Record the training data of a new run; refuse to resume one whose training table has changed since."""
    if table is None:  # shards stream from files a run does not hold in memory; nothing to compare
        return
    now, path = data_fingerprint(table), run_dir / DATA_FILE
    if not resuming or not path.is_file():
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(now, indent=2) + "\n")
        return
    before = json.loads(path.read_text())
    if before != now:
        raise ConfigError(
            f"--resume: the training data changed since {run_dir} started ({_counts(before)} then, {_counts(now)} "
            f"now; {path} holds the fingerprint): a resumed run would not continue the same training. Restore the "
            "table (and its images), or train the new data as a new run with another `name`"
        )


def _counts(fingerprint: dict[str, Any]) -> str:
    same = "" if "sha256" not in fingerprint else f", digest {fingerprint['sha256'][:12]}"
    return f"{fingerprint.get('images')} images, {fingerprint.get('captions')} captions{same}"


def check_progress(checkpoint: Path, done_epochs: int, epochs: int) -> None:
    """A resumed run must have epochs left (or exactly none, which only writes the final model)."""
    if done_epochs > epochs:
        raise ConfigError(
            f"--resume: train.epochs is {epochs} but {checkpoint} has already trained {done_epochs} epochs; set "
            f"train.epochs to {done_epochs} (to finish the run where it stands) or more"
        )
