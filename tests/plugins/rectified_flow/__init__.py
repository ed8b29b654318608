"""Tests of plugins/rectified_flow."""
