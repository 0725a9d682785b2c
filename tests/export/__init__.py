"""Tests of cliptune.export."""
