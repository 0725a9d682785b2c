"""Tests of cliptune.eval."""
