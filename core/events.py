"""Trainer events: the `registry.hookspecs.TrainerHooks`, called on the main process only.

`Events` looks the implementations up once: an event no plugin implements is
None, and the trainer skips it at the cost of one attribute test.
"""

from __future__ import annotations

import functools
from typing import Any

import registry

#: The trainer events, hook ``flowforge_<event>`` each.
EVENTS = ("run_start", "step_end", "evaluated", "checkpoint_written", "run_end")


class Events:
    """``events.step_end(step=..., logs=...)`` calls every ``flowforge_step_end`` with ``trainer``."""

    run_start: Any
    step_end: Any
    evaluated: Any
    checkpoint_written: Any
    run_end: Any

    def __init__(self, trainer: Any, enabled: bool = True):
        hook = registry.default.hook
        for event in EVENTS:
            caller = getattr(hook, f"flowforge_{event}")
            active = enabled and bool(caller.get_hookimpls())
            setattr(self, event, functools.partial(caller, trainer=trainer) if active else None)

    def __call__(self, event: str, **kwargs: Any) -> None:
        """Call `event` when some plugin implements it."""
        caller = getattr(self, event)
        if caller is not None:
            caller(**kwargs)
