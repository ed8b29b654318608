"""Tests of registry/: plugin loading, building, errors, extension points, the plugin template."""
