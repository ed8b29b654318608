"""Reference implementations the tests check flowforge against (written from the papers' code)."""
