"""flowforge plugin family `unet` (components are added by its issue's work)."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
