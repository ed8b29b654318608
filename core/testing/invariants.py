"""The two primitives every conformance check of `core.testing` is written with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def require(ok: bool, component: str, invariant: str, detail: str) -> None:
    """Raise ``AssertionError("<component> violates '<invariant>': <detail>")`` unless `ok`."""
    if not ok:
        raise AssertionError(f"{component} violates '{invariant}': {detail}")


@contextlib.contextmanager
def checking(component: str, invariant: str) -> Iterator[None]:
    """Name the invariant being checked on any error the component itself raises (a note on the exception)."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        exc.add_note(f"(raised by {component} while the conformance kit checked '{invariant}')")
        raise
