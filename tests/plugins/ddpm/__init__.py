"""Tests of plugins/ddpm."""
