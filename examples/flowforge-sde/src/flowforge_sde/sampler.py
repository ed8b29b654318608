r"""Euler–Maruyama sampling of a flow model on the SDE with the probability-flow marginals.

Setting. An affine Gaussian path ``x_t = alpha_t x_1 + sigma_t x_0`` with
``x_0 ~ N(0, I)`` (t = 0 noise, t = 1 data) and a model of its marginal
velocity ``u(x, t) = E[d_alpha_t x_1 + d_sigma_t x_0 | x_t = x]``. The ODE
``dx = u dt`` transports ``p_0`` to ``p_1`` through the marginals ``p_t``.

The score from the velocity. Write ``X_1 = E[x_1 | x_t = x]`` and
``X_0 = E[x_0 | x_t = x]``. Taking conditional expectations of the path and of
its velocity gives two linear equations::

    x = alpha_t X_1 + sigma_t X_0
    u = d_alpha_t X_1 + d_sigma_t X_0

Eliminating ``X_1`` (multiply the second by alpha_t, the first by d_alpha_t,
subtract): ``alpha_t u - d_alpha_t x = (alpha_t d_sigma_t - d_alpha_t sigma_t) X_0``.
For a Gaussian source Tweedie's formula gives the score of ``p_t`` as
``s(x, t) = grad log p_t(x) = -X_0 / sigma_t``, hence::

    s(x, t) = (alpha_t u - d_alpha_t x) / (sigma_t (d_alpha_t sigma_t - alpha_t d_sigma_t))

(``d_alpha_t sigma_t - alpha_t d_sigma_t = sigma_t^2 d/dt(alpha_t / sigma_t) > 0``
because the signal-to-noise ratio increases). Check at t = 0 for cond_ot:
``s = -x``, the score of N(0, I).

The SDE. For any ``g(t) >= 0``::

    dx = [u(x, t) + g(t)^2 / 2 * s(x, t)] dt + g(t) dW

has the same marginals ``p_t``: its Fokker–Planck equation is
``d_t p = -div(p u) - g^2/2 div(p grad log p) + g^2/2 lap p = -div(p u)``,
the continuity equation of the ODE, because ``p grad log p = grad p``.
``g = 0`` is the probability-flow ODE itself.

The diffusion. ``g(t)^2 = scale * w(t)`` with ``w = sigma_t`` ("sigma", the
default: it vanishes at the data end where the score blows up, so the drift
``u + scale/2 * (alpha_t u - d_alpha_t x) / (d_alpha_t sigma_t - alpha_t d_sigma_t)``
stays finite) or ``w = 1`` ("constant").

The scheme. On the uniform grid ``t_k = t0 + k h``::

    x_{k+1} = x_k + h * drift(x_k, t_k) + sqrt(g(t_k)^2 h) * xi_k,   xi_k ~ N(0, I)

one model evaluation per step; the noise comes from the ``generator`` given
to ``sample`` (the runner's seeded one), and by default the last step adds
none (it lands on the mean, as samplers of diffusion models do).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import Tensor

from core.interfaces import Field, Scheduler, Solver, SolverResult
from core.nn import append_dims
from registry import ConfigError


@attrs.define
class SDEConfig:
    """Options of the euler_maruyama solver.

    Attributes:
        steps: number of uniform Euler-Maruyama steps from t0 to t1 (model evaluations = steps).
        diffusion: shape w(t) of the squared diffusion g(t)^2 = scale * w(t): "sigma" (w = sigma_t,
            vanishing at the data end) or "constant" (w = 1).
        scale: strength of the noise; 0 is the probability-flow ODE sampled with Euler steps.
        denoise_last: add no noise on the last step.
        t0: start time (0: the source).
        t1: end time (1: the data).
    """

    steps: int = 100
    diffusion: Literal["sigma", "constant"] = "sigma"
    scale: float = 1.0
    denoise_last: bool = True
    t0: float = 0.0
    t1: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"expected a positive integer, got {self.steps}", ("steps",))
        if self.scale < 0:
            raise ConfigError(f"expected a non-negative number, got {self.scale}", ("scale",))
        if not 0.0 <= self.t0 < self.t1 <= 1.0:
            raise ConfigError(f"expected 0 <= t0 < t1 <= 1, got t0={self.t0}, t1={self.t1}", ("t0",))


def score_from_velocity(u: Tensor, x: Tensor, t: Tensor, scheduler: Scheduler) -> Tensor:
    """The score ``grad log p_t(x)`` from the marginal velocity ``u`` (see the module docstring).

    ``u`` and ``x`` are ``(B, ...)``, ``t`` is ``(B,)`` with ``sigma_t > 0``.
    """
    c = scheduler(t)
    a, s, da, ds = (append_dims(v, x.ndim) for v in (c.alpha_t, c.sigma_t, c.d_alpha_t, c.d_sigma_t))
    return (a * u - da * x) / (s * (da * s - a * ds))


class EulerMaruyama(Solver):
    """Euler–Maruyama on ``dx = [u + g^2/2 s] dt + g dW`` (see the module docstring)."""

    def __init__(self, config: SDEConfig, scheduler: Scheduler):
        self.config, self.scheduler = config, scheduler

    def time_grid(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        c = self.config
        return torch.linspace(c.t0, c.t1, c.steps + 1, device=device, dtype=dtype)

    def g2(self, t: Tensor) -> Tensor:
        """The squared diffusion coefficient ``g(t)^2``, shaped like ``t``."""
        c = self.config
        if c.diffusion == "sigma":
            return c.scale * self.scheduler(t).sigma_t
        return torch.full_like(t, c.scale)

    def drift(self, u: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``u + g(t)^2 / 2 * s(x, t)``, written so that the "sigma" diffusion stays finite as sigma_t -> 0."""
        c = self.config
        if c.scale == 0:
            return u
        k = self.scheduler(t)
        a, s, da, ds = (append_dims(v, x.ndim) for v in (k.alpha_t, k.sigma_t, k.d_alpha_t, k.d_sigma_t))
        # g^2 / (2 sigma) times (a u - da x) / (da s - a ds)
        half_g2_over_sigma = c.scale / 2 if c.diffusion == "sigma" else c.scale / (2 * s)
        return u + half_g2_over_sigma * (a * u - da * x) / (da * s - a * ds)

    @torch.no_grad()
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        dtype = x_init.dtype if x_init.dtype.is_floating_point else torch.float32
        grid = self.time_grid(x_init.device, dtype)
        batch, steps = x_init.shape[0], self.config.steps
        x = x_init
        traj = [x] if intermediates else None
        for k in range(steps):
            t = grid[k].expand(batch)
            h = grid[k + 1] - grid[k]
            x_next = x + h * self.drift(model(x, t, y), x, t)
            last = k == steps - 1
            if self.config.scale > 0 and not (last and self.config.denoise_last):
                noise = torch.randn(x.shape, generator=generator, dtype=dtype,
                                    device=generator.device if generator is not None else x.device).to(x.device)
                x_next = x_next + append_dims(torch.sqrt(self.g2(t) * h), x.ndim) * noise
            x = x_next
            if traj is not None:
                traj.append(x)
        return SolverResult(x=x, nfe=steps, trajectory=torch.stack(traj) if traj is not None else None,
                            times=grid if intermediates else None)


def build(config: SDEConfig, scheduler: Scheduler | None = None, path=None) -> EulerMaruyama:
    """Solver factory: needs the experiment's ``[scheduler]`` (or a path that carries one)."""
    scheduler = scheduler if scheduler is not None else getattr(path, "scheduler", None)
    if scheduler is None:
        raise ConfigError('euler_maruyama needs the experiment\'s [scheduler] section (e.g. plugin = "cond_ot") '
                          "to turn the model's velocity into a score")
    return EulerMaruyama(config, scheduler)
