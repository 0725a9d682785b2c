"""Tests of cliptune.data."""
