"""Tests of plugins/tinyclip."""
