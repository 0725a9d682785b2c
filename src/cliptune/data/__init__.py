"""Data loading for cliptune: caption tables, labelled image sets and the torch datasets over them."""

from cliptune.data.classification import LabelledImages, read_classification
from cliptune.data.datasets import ImageFiles, Skip, TrainPairs, collate_skip_none
from cliptune.data.errors import DataError
from cliptune.data.images import is_readable, load_rgb
from cliptune.data.tables import CaptionTable, read_caption_table

__all__ = [
    "CaptionTable",
    "DataError",
    "ImageFiles",
    "LabelledImages",
    "Skip",
    "TrainPairs",
    "collate_skip_none",
    "is_readable",
    "load_rgb",
    "read_caption_table",
    "read_classification",
]
