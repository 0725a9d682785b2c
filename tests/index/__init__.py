"""Tests of cliptune.index."""
