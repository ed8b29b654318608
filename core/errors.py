"""Run outcomes that cross process boundaries: launchers re-raise them from their workers.

`NonFiniteLossError` is raised by the trainer and re-raised by launcher
plugins (exit status 1); `core.signals.StopRequested` is its sibling for a
stop on a signal. Both live below the engine so that launchers need not import it.
"""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before writing anything that absorbed it."""
