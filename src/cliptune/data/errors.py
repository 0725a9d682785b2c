"""The error type for data a user got wrong: bad tables, list files, folders or images."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem the user can fix; the message names the file, the line or row, the column and the fix."""
