"""Fixed-step explicit Runge-Kutta solvers for ``dx/dt = u(x, t)`` from t=0 to t=1.

With ``h = t_{k+1} - t_k`` and ``f(x, t) = u(x, t, y)``:

* euler (order 1, 1 evaluation/step):   ``x + h f(x, t)``
* midpoint (order 2, 2 evaluations):    ``x + h f(x + h/2 f(x, t), t + h/2)``
* heun (order 2, 2 evaluations):        ``x + h/2 (k1 + k2)``, ``k2 = f(x + h k1, t + h)``
* rk4 (order 4, 4 evaluations):         the classical ``(k1 + 2 k2 + 2 k3 + k4) / 6``
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import Tensor

from core.interfaces import Field, Solver, SolverResult

STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


@attrs.define
class ODEConfig:
    """Options of the ode solver.

    Attributes:
        method: euler, midpoint, heun or rk4.
        steps: number of uniform steps from t0 to t1 (evaluations = steps x stages).
        t0: start time (0: the source).
        t1: end time (1: the data).
    """

    method: Literal["euler", "midpoint", "heun", "rk4"] = "midpoint"
    steps: int = 20
    t0: float = 0.0
    t1: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.steps < 1:
            from registry import ConfigError

            raise ConfigError(f"expected a positive integer, got {self.steps}", ("steps",))


def rk_step(method: str, f: Field, x: Tensor, t: Tensor, h: Tensor, y: Tensor | None) -> Tensor:
    """One step of `method` from ``(x, t)`` with step ``h``; ``t`` and ``h`` are ``(B,)``-broadcastable tensors."""
    hb = h.reshape(-1, *([1] * (x.ndim - 1))) if h.ndim else h
    if method == "euler":
        return x + hb * f(x, t, y)
    if method == "midpoint":
        k1 = f(x, t, y)
        return x + hb * f(x + 0.5 * hb * k1, t + 0.5 * h, y)
    if method == "heun":
        k1 = f(x, t, y)
        k2 = f(x + hb * k1, t + h, y)
        return x + 0.5 * hb * (k1 + k2)
    if method == "rk4":
        k1 = f(x, t, y)
        k2 = f(x + 0.5 * hb * k1, t + 0.5 * h, y)
        k3 = f(x + 0.5 * hb * k2, t + 0.5 * h, y)
        k4 = f(x + hb * k3, t + h, y)
        return x + hb / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    raise ValueError(f"unknown method {method!r}")


class ODESolver(Solver):
    """Integrates ``model(x, t, y)`` on a uniform grid with a fixed-step method."""

    def __init__(self, config: ODEConfig | None = None):
        self.config = config or ODEConfig()

    def time_grid(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        c = self.config
        return torch.linspace(c.t0, c.t1, c.steps + 1, device=device, dtype=dtype)

    @torch.no_grad()
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        grid = self.time_grid(x_init.device, x_init.dtype if x_init.dtype.is_floating_point else torch.float32)
        batch = x_init.shape[0]
        x = x_init
        traj = [x] if intermediates else None
        method = self.config.method
        for k in range(self.config.steps):
            t = grid[k].expand(batch)
            h = grid[k + 1] - grid[k]
            x = rk_step(method, model, x, t, h, y)
            if traj is not None:
                traj.append(x)
        return SolverResult(x=x, nfe=self.config.steps * STAGES[method],
                            trajectory=torch.stack(traj) if traj is not None else None,
                            times=grid if intermediates else None)
