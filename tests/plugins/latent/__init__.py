"""Tests of plugins/latent."""
