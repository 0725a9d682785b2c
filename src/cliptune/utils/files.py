"""Atomic file writes: a crash mid-write never leaves a half-written checkpoint or result behind.

A write goes to a temporary beside its target, named after the writer (`.NAME.PID@HOST.tmp`), and takes the target's
place in one rename. A killed writer leaves its temporary behind; `remove_stale_temporaries` deletes those whose writer
is gone, and never one whose writer still runs. A write that fails for lack of space (or a file-size limit) raises
`DiskFullError` naming the file, the space it needed and the space there was.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import resource
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HOST = socket.gethostname()
# `.NAME.PID@HOST.tmp` (or `.old`, a target being replaced); `.NAME.tmpPID` / `.NAME.oldPID` from older releases.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[^@/]+)\.(?:tmp|old)$")
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)(?P<pid>\d+)$")
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# What torch's zip writer and safetensors' Rust writer say instead of raising an OSError with an errno.
_FULL_WORDS = ("os error 28", "os error 27", "os error 122", "no space left", "file too large", "quota exceeded")


class DiskFullError(OSError):
    """A file could not be written for lack of space or a file-size limit; the message says which and how much."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "disk full"


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """The temporary beside `path` that this process writes before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}@{HOST}.{kind}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_gone(name: str) -> bool:
    """True for a temporary whose writer is known to be dead; a writer on another host cannot be checked: kept."""
    match = _TEMP.match(name) or _LEGACY_TEMP.match(name)
    if match is None:
        return False
    host = match.groupdict().get("host") or HOST
    return host == HOST and not pid_alive(int(match["pid"]))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove_stale_temporaries(folder: Path, recursive: bool = True) -> tuple[list[Path], int]:
    """Delete the temporaries of dead writers under `folder`; return them and the bytes freed."""
    removed, freed = [], 0
    for path in _temporaries(folder, recursive):
        if not _writer_gone(path.name):
            continue
        try:
            size = _size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # removed meanwhile by another cleaner
            continue
        removed.append(path)
        freed += size
    return removed, freed


def _temporaries(folder: Path, recursive: bool) -> Iterator[Path]:
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if _TEMP.match(entry.name) or _LEGACY_TEMP.match(entry.name):
            yield entry
        elif recursive and entry.is_dir() and not entry.is_symlink():
            yield from _temporaries(entry, recursive)


def is_within(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """Whether `path`, with every symlink and `..` resolved, lies inside one of `roots` (also resolved).

    What a reader that must stay inside given folders (a search server and its index's image roots) asks of every
    path before opening it.
    """
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def close_folders(path: str | Path, n: int = 5, files: bool = False) -> list[Path]:
    """Existing folders (and with `files`, files) named like the first missing part of `path`: what a mistyped
    name probably meant."""
    path = Path(path).expanduser()
    base = path
    while not base.is_dir() and base != base.parent:
        base = base.parent
    if base == path or not base.is_dir():
        return []
    missing = path.relative_to(base).parts[0]
    try:
        names = [p.name for p in base.iterdir() if (files or p.is_dir()) and not p.name.startswith(".")]
    except OSError:
        return []
    return [base / name for name in difflib.get_close_matches(missing, names, n=n, cutoff=0.6)]


# ---------------------------------------------------------------------------------------------------------------
# Disk full


def tensor_bytes(obj: Any) -> int:
    """Bytes of tensor data in a (nested) state dict: what writing it needs, give or take a small header."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _is_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    return any(word in str(error).lower() for word in _FULL_WORDS)


def _would_not_fit(written: Path, needed: int | None) -> bool:
    """After a failed write: did the file need more than the device (or the file-size limit) allowed?"""
    if needed is None:
        return False
    partial = written.stat().st_size if written.is_file() else 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    free = shutil.disk_usage(_existing(written)).free + partial
    return needed > free or (limit != resource.RLIM_INFINITY and needed > limit)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def space_report(folder: Path, needed: int | None) -> str:
    """How much a write needed against what the device and this process's file-size limit allow."""
    parts = [f"it needs about {_mb(needed)}"] if needed is not None else []
    parts.append(f"{_mb(shutil.disk_usage(_existing(folder)).free)} are free there")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        parts.append(f"this process may write files of at most {_mb(limit)} (`ulimit -f`)")
    return "; ".join(parts)


@contextmanager
def writing(path: Path, needed: int | None = None, written: Path | None = None) -> Iterator[None]:
    """Turn a failed write of `path` for lack of space into one `DiskFullError` naming it and the space needed.

    `written` is the file actually being written (a temporary), when it is not `path` itself. Libraries report a
    full disk in their own words (torch's zip writer only says "unexpected pos"), so besides the error itself the
    file's size is compared with the free space and the file-size limit.
    """
    written = written or path
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not (_is_full(e) or _would_not_fit(written, needed)):
            raise
        raise _full_error(path, e, needed) from None


def _full_error(path: Path, error: Exception, needed: int | None) -> DiskFullError:
    return DiskFullError(f"could not write {path} ({_reason(error, needed)}): {space_report(path.parent, needed)}")


def _reason(error: Exception, needed: int | None) -> str:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    over_limit = limit != resource.RLIM_INFINITY and needed is not None and needed > limit
    if getattr(error, "errno", None) == errno.EFBIG or "too large" in str(error).lower() or over_limit:
        return "over the file-size limit"
    return "no space left on the device"


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes


@contextmanager
def atomic_write(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    `needed` (bytes, if known) goes into the message should the disk be full.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with writing(path, needed, tmp):
            yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it takes `path`'s place (an old one is removed).

    Temporaries that killed writers left beside it go first (a folder of checkpoints would otherwise keep one per
    kill). A full disk is reported naming the file being written; wrap a file's write in `writing(...)` to have
    the message also say how much that file needed.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent, recursive=False)
    tmp = temporary_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        try:
            yield tmp
        except DiskFullError as e:  # named after the temporary: say the file the user will look for
            raise DiskFullError(str(e).replace(str(tmp), str(path))) from None
        except Exception as e:
            if not _is_full(e):
                raise
            raise _full_error(path / _newest(tmp).relative_to(tmp), e, None) from None
        if path.exists():
            old = temporary_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _newest(folder: Path) -> Path:
    """The file written last in `folder` (the one a failed write was writing), or the folder itself."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else folder
