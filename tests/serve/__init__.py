"""Tests of cliptune.serve."""
