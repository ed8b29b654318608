"""Tests of core/: configuration, the trainer, run directories, helpers, layering, docs reference."""
