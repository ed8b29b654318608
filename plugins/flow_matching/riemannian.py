r"""A Riemannian ODE solver: fixed-step Runge-Kutta on a manifold (Chen & Lipman 2023; Meta flow_matching).

Integrates ``dx/dt = u(x, t)`` on the geodesic path's manifold from ``t0`` to ``t1`` with the Butcher
tableaus of solver.py (euler, midpoint, heun, rk4). Every stage evaluates the model at a point of the
manifold and keeps only the tangent part of its output, ``k_i = proju(p_i, u(p_i, t + c_i h))``, and every
move from ``x`` by an increment ``w = h sum_j a_ij k_j`` is a retraction ``R_x(w)``:

* ``retraction = "exp"``: ``R_x(w) = projx(exp_x(proju(x, w)))`` with every ``k_j`` first carried from
  its point to ``T_x`` by ``transp`` (parallel transport on the sphere): geodesic steps, exact for a field
  that is the velocity of a geodesic (e.g. a rotation of the sphere on its equator);
* ``retraction = "projx"``: ``R_x(w) = projx(x + w)`` (the step of Meta's RiemannianODESolver).

    p_i = R_x(h sum_{j<i} a_ij k_j)  (p_0 = x),      x_next = R_x(h sum_i b_i k_i).

On the flat torus both are ``(x + w) mod 2 pi``; on Euclidean space both are the ``ode`` solver's step.
The final ``projx`` keeps every state on the manifold to rounding error after any number of steps.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from core.interfaces import Field, Solver, SolverResult
from registry import ConfigError

from .manifolds import Manifold
from .solver import STAGES, TABLEAUS, Tableau, stage_times, uniform_grid, weighted_sum


@attrs.define
class RiemannianODEConfig:
    """Options of the riemannian_ode solver.

    Attributes:
        method: euler, midpoint, heun or rk4 (the tableaus of the ode solver).
        steps: number of uniform steps from t0 to t1 (model evaluations = steps x stages).
        t0: start time (0: the source).
        t1: end time (1: the data).
        retraction: how a step moves on the manifold: "exp" (geodesic steps exp_x(increment), the stage
            velocities parallel-transported to x; rk4 is then third order) or "projx" (projx(x + increment) in
            the embedding, Meta's RiemannianODESolver; rk4 keeps its fourth order).
        proju: project the model's output onto the tangent space at each stage point.
    """

    method: Literal["euler", "midpoint", "heun", "rk4"] = "midpoint"
    steps: int = 50
    t0: float = 0.0
    t1: float = 1.0
    retraction: Literal["exp", "projx"] = "exp"
    proju: bool = True

    def __attrs_post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"expected a positive integer, got {self.steps}", ("steps",))
        if self.t0 == self.t1:
            raise ConfigError(f"t1 must differ from t0 = {self.t0}", ("t1",))


def retract(manifold: Manifold, x: Tensor, w: Tensor, kind: str = "exp") -> Tensor:
    """``R_x(w)`` ``(B, ..., D)`` of the module docstring for the ambient increment ``w``."""
    if kind == "exp":
        return manifold.projx(manifold.expmap(x, manifold.proju(x, w)))
    if kind == "projx":
        return manifold.projx(x + w)
    raise ValueError(f"unknown retraction {kind!r}")


def riemannian_step(tab: Tableau, f: Field, manifold: Manifold, x: Tensor, times: list[Tensor], h: float,
                    y: Tensor | None = None, kind: str = "exp", proju: bool = True) -> Tensor:
    """One step of `tab` from ``x (B, ..., D)`` with step `h` and stage times ``times[i] (B,)``.

    With the exp retraction each stage's velocity is first carried from its point ``p_i`` to ``T_x``
    (``transp``: parallel transport on the sphere), so that the increments add in one tangent space.
    """
    ks: list[Tensor] = []  # the stage velocities, in T_x for "exp", ambient for "projx"
    for row, t in zip(tab.a, times):
        p = x if not any(row) else retract(manifold, x, h * weighted_sum(ks[:len(row)], row), kind)
        k = f(p, t, y)
        k = manifold.proju(p, k) if proju else k
        ks.append(manifold.transp(p, x, k) if kind == "exp" and p is not x else k)
    return retract(manifold, x, (h / tab.denominator) * weighted_sum(ks, tab.weights), kind)


class RiemannianODESolver(Solver):
    """Integrates ``model(x, t, y)`` on `manifold` (module docstring)."""

    def __init__(self, config: RiemannianODEConfig, manifold: Manifold):
        self.config, self.manifold = config, manifold

    @property
    def nfe_per_sample(self) -> int:
        return self.config.steps * STAGES[self.config.method]

    def time_grid(self, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``steps + 1`` uniform times from t0 to t1."""
        c = self.config
        return uniform_grid(c.t0, c.t1, c.steps, device=device, dtype=dtype)

    @torch.no_grad()
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        c, tab = self.config, TABLEAUS[self.config.method]
        exact = self.time_grid("cpu", torch.float64)
        hs = (exact[1:] - exact[:-1]).tolist()
        grid = exact.to(x_init.device, x_init.dtype)
        times = {cc: stage_times(grid, cc)[:, None].expand(c.steps, x_init.shape[0]) for cc in set(tab.c)}
        x = self.manifold.projx(x_init)
        traj = [x] if intermediates else None
        for k in range(c.steps):
            x = riemannian_step(tab, model, self.manifold, x, [times[cc][k] for cc in tab.c], hs[k], y,
                                c.retraction, c.proju)
            if traj is not None:
                traj.append(x)
        return SolverResult(x=x, nfe=c.steps * tab.stages, trajectory=torch.stack(traj) if traj else None,
                            times=grid if intermediates else None)

    def __repr__(self) -> str:
        return f"RiemannianODESolver({self.config.method}, steps={self.config.steps}, {self.manifold!r})"


def make_riemannian_ode(config: RiemannianODEConfig, path: Any = None) -> RiemannianODESolver:
    """Solver factory for ``plugin = "riemannian_ode"``: needs a [path] on a manifold (``geodesic``)."""
    manifold = getattr(path, "manifold", None)
    if not isinstance(manifold, Manifold):
        raise ConfigError(f"the riemannian_ode solver integrates on the manifold of a geodesic path; the [path] "
                          f"{type(path).__name__ if path is not None else '(none)'} has no manifold "
                          f"(use plugin = \"geodesic\", or the ode solver)", ("plugin",))
    return RiemannianODESolver(config, manifold)


__all__ = ["RiemannianODEConfig", "RiemannianODESolver", "make_riemannian_ode", "retract", "riemannian_step"]
