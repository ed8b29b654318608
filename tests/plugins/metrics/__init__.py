"""Tests of plugins/metrics."""
