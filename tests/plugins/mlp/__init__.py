"""Tests of plugins/mlp."""
