"""Tests of plugins/dit."""
