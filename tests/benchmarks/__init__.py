"""Tests of the scripts in benchmarks/ (their fast cases and result tables)."""
