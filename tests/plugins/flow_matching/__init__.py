"""Tests of plugins/flow_matching."""
