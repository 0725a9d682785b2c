"""Tests of cliptune.features."""
