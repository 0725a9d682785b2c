"""Searching your images with a model: a resumable embedding index (`Index.build`) and queries (`Index.search`)."""

from cliptune.index.index import Hit, Index

__all__ = ["Hit", "Index"]
