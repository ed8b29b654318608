"""Tests of plugins/unet."""
