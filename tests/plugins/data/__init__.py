"""Tests of plugins/data."""
