"""Tests of cliptune.utils."""
