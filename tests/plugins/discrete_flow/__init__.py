"""Tests of plugins/discrete_flow."""
