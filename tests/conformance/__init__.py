"""Conformance kits (core/testing) over every first-party component, and cross-family shape checks."""
