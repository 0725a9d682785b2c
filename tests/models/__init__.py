"""Tests of cliptune.models."""
