"""Tests of cliptune.train."""
