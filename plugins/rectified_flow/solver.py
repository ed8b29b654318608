"""The ``one_step`` solver: one euler step of the ``ode`` solver, ``x_1 = x_0 + u(x_0, 0)`` (one model evaluation).

The sampler a 2-rectified flow is meant for: its straight paths make the single step accurate.
"""

from __future__ import annotations

from typing import Any

import registry


def make_one_step(config: None = None, scheduler: Any = None, path: Any = None, spec: Any = None) -> Any:
    """Solver factory for ``plugin = "one_step"``: the ode solver with one euler step (one model evaluation)."""
    return registry.build("solver", {"plugin": "ode", "method": "euler", "steps": 1}, scheduler=scheduler, path=path,
                          spec=spec)
