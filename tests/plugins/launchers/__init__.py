"""Tests of plugins/launchers."""
