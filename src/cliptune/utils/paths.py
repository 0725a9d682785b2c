"""Paths read from a run or model folder stay inside it: a pointer file or a symlink cannot lead cliptune elsewhere."""

from __future__ import annotations

from pathlib import Path


class PathEscapeError(ValueError):
    """A path named inside a folder (a pointer, a symlink, a spec entry) that resolves outside that folder."""


def inside(root: str | Path, relative: str | Path, what: str) -> Path:
    """`root / relative`, required to resolve (symlinks followed) to a place inside `root`.

    `what` names where the path came from (a file and its field), so the error says what to repair.
    """
    root = Path(root)
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise PathEscapeError(f"{what}: {str(relative)!r} must be a name inside {root}, not an absolute path or '..'")
    path = root / relative
    base, resolved = root.resolve(), path.resolve()
    if resolved != base and base not in resolved.parents:
        raise PathEscapeError(f"{what}: {path} resolves to {resolved}, outside {base}; remove that link or pointer")
    return path
