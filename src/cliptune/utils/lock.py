"""A folder owned by one live process: the run lock that keeps two trainings out of one run folder.

The lock file records its owner (pid, host, start time) for the messages; the exclusion itself is the kernel's
`flock`, which a dying process releases however it dies, so a lock left by a killed run is free to take (and is
taken over with a message naming the dead owner), while a live owner's lock refuses everyone else at once, whatever
the timing. Where the file system has no `flock`, the recorded pid is checked instead (on this host only).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cliptune.utils.files import HOST, pid_alive

LOCK_FILE = "run.lock"
log = logging.getLogger("cliptune")


class FolderInUseError(RuntimeError):
    """Another live process owns the folder."""


class FolderLock:
    """Exclusive ownership of `folder` by this process until `release()` (or the process's death)."""

    def __init__(self, folder: Path, purpose: str = "training") -> None:
        self.path = Path(folder) / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed meanwhile (an owner refused before it wrote)
                continue
            try:
                if self._try_lock(fd) and _same_file(fd, self.path):
                    break
            except BaseException:
                os.close(fd)
                raise
            # The owner released (and removed) the file between our open and our lock: lock the new one instead.
            os.close(fd)
        self._fd = fd
        self._take(fd)
        return self

    def _try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise FolderInUseError(self._in_use(_read(fd))) from None
        except OSError as e:  # no flock here (some network file systems): trust a recorded live owner
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            owner = _read(fd)
            if owner and (owner.get("host") != HOST or pid_alive(int(owner.get("pid", -1)))):
                raise FolderInUseError(self._in_use(owner)) from None
            return True

    def _in_use(self, owner: dict[str, Any]) -> str:
        who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}" if owner else "another process"
        since = f" since {owner['started']}" if "started" in owner else ""
        return (
            f"{self.path.parent} is in use: {who} has been {self.purpose} into it{since} ({self.path}). Two runs "
            "must not write one run folder: wait for that one to finish, or set another `name`"
        )

    def _take(self, fd: int) -> None:
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():
            log.warning(
                "%s: taking over the lock of process %s on %s, which is gone (it stopped without releasing it)",
                self.path.parent,
                previous.get("pid", "?"),
                previous.get("host", "?"),
            )
        record = {"pid": os.getpid(), "host": HOST, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)

    def release(self) -> None:
        """Remove the lock file, then unlock: a process waiting on the removed file re-opens the path."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    """The owner record in an open lock file; empty if there is none yet (or it is not ours to read)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
