"""One-step and few-step samplers.

* ``one_step``: one euler step of the ``ode`` solver, ``x_1 = x_0 + u(x_0, 0)`` (one model evaluation), the
  sampler a 2-rectified flow (or its distillation) is meant for: its straight paths make the single step accurate.
* ``meanflow``: MeanFlow's sampler (objective.py): ``k`` jumps ``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i, t_{i+1})``
  of the average velocity on the uniform grid ``t_i = i / k`` (``k = 1``: ``x_1 = x_0 + u(x_0, 0, 1)``).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

import registry
from core.interfaces import Field, Solver, SolverResult
from core.nn import append_dims
from registry import ConfigError


def make_one_step(config: None = None, scheduler: Any = None, path: Any = None, spec: Any = None) -> Any:
    """Solver factory for ``plugin = "one_step"``: the ode solver with one euler step (one model evaluation)."""
    return registry.build("solver", {"plugin": "ode", "method": "euler", "steps": 1}, scheduler=scheduler, path=path,
                          spec=spec)


@attrs.define
class MeanFlowSolverConfig:
    """Options of the meanflow solver.

    Attributes:
        steps: number of average-velocity jumps on the uniform grid t_i = i / steps (1: one-step generation).
    """

    steps: int = 1

    def __attrs_post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"expected a positive integer, got {self.steps}", ("steps",))


class MeanFlowSolver(Solver):
    """``x_{i+1} = x_i + (t_{i+1} - t_i) field(x_i, t_i, y, r=t_{i+1})`` on ``t_i = i / steps`` (objective.py)."""

    def __init__(self, config: MeanFlowSolverConfig):
        self.config = config

    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        k, x = self.config.steps, x_init
        grid = torch.linspace(0.0, 1.0, k + 1, dtype=torch.float64)
        states = [x]
        for i in range(k):
            t = torch.full((x.shape[0],), float(grid[i]), device=x.device, dtype=x.dtype)
            r = torch.full_like(t, float(grid[i + 1]))
            x = x + append_dims(r - t, x.ndim) * model(x, t, y, r=r)
            states.append(x)
        if not intermediates:
            return SolverResult(x=x, nfe=k)
        return SolverResult(x=x, nfe=k, trajectory=torch.stack(states), times=grid.to(x.dtype))


def make_meanflow(config: MeanFlowSolverConfig) -> MeanFlowSolver:
    """Solver factory for ``plugin = "meanflow"``."""
    return MeanFlowSolver(config)
