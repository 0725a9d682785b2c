"""What is trainable and how: tower locking (more strategies plug in here)."""

from cliptune.tuning.locking import apply_locking, trainable_summary

__all__ = ["apply_locking", "trainable_summary"]
