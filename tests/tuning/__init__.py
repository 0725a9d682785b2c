"""Tests of cliptune.tuning."""
