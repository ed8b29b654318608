"""Tests of the first-party plugin families, one folder each (tests/plugins/<family>)."""
