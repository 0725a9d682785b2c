"""Tests of cliptune.losses."""
