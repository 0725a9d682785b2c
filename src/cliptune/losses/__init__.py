"""Training objectives, chosen by name in the config (`loss.name`): the `OBJECTIVES` table and its losses."""

from __future__ import annotations

from cliptune.losses.clip import MAX_LOGIT_SCALE, clip_loss
from cliptune.losses.objective import OBJECTIVES, ObjectiveSpec

__all__ = ["MAX_LOGIT_SCALE", "OBJECTIVES", "ObjectiveSpec", "clip_loss"]
