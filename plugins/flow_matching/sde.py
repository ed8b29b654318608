r"""SDE samplers for flow models (``sde``): Euler-Maruyama and stochastic Heun, SiT's diffusion choices.

A velocity model ``v(x, t)`` of the marginals ``p_t`` (t = 0 noise, t = 1 data) and
the score ``s = grad log p_t`` give, for any diffusion ``w(t) >= 0``, the SDE

    dx = [v(x, t) + w(t) s(x, t)] dt + sqrt(2 w(t)) dW                          (SiT, Ma et al. 2024, eq. 6)

with the same marginals: its Fokker-Planck equation is
``d_t p = -div(p v) - div(p w grad log p) + w lap p = -div(p v)`` (``p grad log p = grad p``).
``w = 0`` is the ODE.

The score. For the affine path with a Gaussian source, from the velocity (paths.py):
``s = -E[x_0 | x_t] / sigma_t`` with ``E[x_0 | x_t] = (alpha v - d alpha x) / (alpha d sigma - sigma d alpha)``.
A ``velocity_score`` model of an interpolant path (interpolants.py) gives its own learned score.

Diffusion ``w(t)`` (``diffusion``, scaled by ``norm``; SiT's ``compute_diffusion`` in this time convention):

* ``constant``: ``norm``
* ``SBDM``: ``norm (d alpha / alpha sigma^2 - sigma d sigma)``, the diffusion of the score-based
  (VP / VE) SDE whose marginals are the path's (cond_ot: ``(1 - t) / t``; infinite at t = 0, so t0 > 0)
* ``sigma``: ``norm sigma_t``
* ``linear``: ``norm (1 - t)``
* ``decreasing``: ``(norm cos(pi t) + 1)^2 / 4``
* ``increasing_decreasing``: ``norm sin(pi t)^2``

The schemes on the uniform grid ``t_k`` from ``t0`` to ``t_N = 1 - last_step_size``, ``h = t_{k+1} - t_k``,
``xi ~ N(0, I)`` from the ``generator`` and ``f = v + w s``:

* ``euler`` (Euler-Maruyama, 1 evaluation):  ``x + h f(x, t_k) + sqrt(2 w(t_k) h) xi``
* ``heun`` (stochastic Heun, SiT's, 2 evaluations): ``x^ = x + sqrt(2 w(t_k) h) xi``,
  ``k1 = f(x^, t_k)``, ``k2 = f(x^ + h k1, t_{k+1})``, ``x^ + h (k1 + k2) / 2``

Last step (``last_step``, from ``t_N`` to 1, one evaluation; the score is singular at t = 1): ``mean``
(``x + h f``, no noise), ``euler`` (``x + h v``), ``tweedie`` (``E[x_1 | x_t]`` from the velocity, affine
paths) or ``none`` (``t_N = 1``: only for a diffusion that vanishes at t = 1, or ``norm = 0``).
The ``mean`` step drops the step's noise but keeps its score pull, so it shrinks the spread by about
``h w(t_N) / Var``: it suits diffusions that vanish at the data end (sigma, linear, SBDM, ...); after a
``constant`` diffusion end with ``euler`` or ``tweedie`` (tests/plugins/flow_matching/test_flow_sde.py pins both).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
from torch import Tensor

from core.interfaces import Field, Path, Solver, SolverResult
from registry import ConfigError

from .path import AffinePath

DIFFUSIONS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing_decreasing")
#: Diffusions that need the affine path's alpha_t, sigma_t.
AFFINE_ONLY = ("SBDM", "sigma")
#: A diffusion below this is zero (sin(pi)^2 = 1.5e-32): no noise and no score evaluation.
TINY = 1e-12


@attrs.define
class SDEConfig:
    """Options of the sde solver.

    Attributes:
        method: "euler" (Euler-Maruyama) or "heun" (stochastic Heun, two evaluations per step).
        steps: number of SDE steps from t0 to 1 - last_step_size.
        diffusion: w(t): constant, SBDM, sigma, linear, decreasing or increasing_decreasing (module docstring).
        norm: the scale of the diffusion (0: the ODE).
        t0: start time (SBDM needs t0 > 0: its diffusion is infinite at t = 0).
        last_step: "mean", "euler", "tweedie" or "none" (module docstring).
        last_step_size: length of the last step to t = 1.
    """

    method: Literal["euler", "heun"] = "euler"
    steps: int = 100
    diffusion: Literal["constant", "SBDM", "sigma", "linear", "decreasing", "increasing_decreasing"] = "sigma"
    norm: float = 1.0
    t0: float = 0.0
    last_step: Literal["mean", "euler", "tweedie", "none"] = "mean"
    last_step_size: float = 0.04

    def __attrs_post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"expected a positive integer, got {self.steps}", ("steps",))
        if self.norm < 0:
            raise ConfigError(f"expected a non-negative number, got {self.norm}", ("norm",))
        end = self.end
        if not 0.0 <= self.t0 < end:
            raise ConfigError(f"expected 0 <= t0 < 1 - last_step_size = {end}, got {self.t0}", ("t0",))
        if self.last_step != "none" and not 0.0 < self.last_step_size < 1.0:
            raise ConfigError(f"expected a number in (0, 1), got {self.last_step_size}", ("last_step_size",))
        if self.diffusion == "SBDM" and self.t0 <= 0.0:
            raise ConfigError("the SBDM diffusion is infinite at t = 0: set t0 > 0 (e.g. 1e-3)", ("t0",))
        if self.last_step == "none" and self.norm > 0 and diffusion_at_one(self) > TINY:
            raise ConfigError(f"last_step = \"none\" evaluates the score at t = 1, where it is singular; the "
                              f"{self.diffusion!r} diffusion does not vanish there: use a last step", ("last_step",))

    @property
    def end(self) -> float:
        """Where the SDE steps stop: ``1 - last_step_size`` (1 with ``last_step = "none"``)."""
        return 1.0 if self.last_step == "none" else 1.0 - self.last_step_size


def diffusion_at_one(config: SDEConfig) -> float:
    """``w(1)`` (0 for the affine-only diffusions, which vanish with sigma_1 = 0)."""
    if config.diffusion in AFFINE_ONLY:
        return 0.0
    return diffusion(config, torch.tensor(1.0, dtype=torch.float64), None)


def diffusion(config: SDEConfig, t: Tensor, path: AffinePath | None) -> float:
    """``w(t)`` of the module docstring at one time ``t`` (a 0-d float64 tensor)."""
    kind, norm = config.diffusion, config.norm
    if kind == "constant":
        return norm
    if kind == "linear":
        return norm * float(1 - t)
    if kind == "decreasing":
        return 0.25 * (norm * math.cos(math.pi * float(t)) + 1) ** 2
    if kind == "increasing_decreasing":
        return norm * math.sin(math.pi * float(t)) ** 2
    s = path.scheduler(t)
    if kind == "sigma":
        return norm * float(s.sigma_t)
    return norm * float(s.d_alpha_t / s.alpha_t * s.sigma_t ** 2 - s.sigma_t * s.d_sigma_t)  # SBDM


class SDESolver(Solver):
    """Euler-Maruyama / stochastic Heun on ``dx = [v + w s] dt + sqrt(2 w) dW`` (module docstring).

    Args:
        config: the options.
        path: the experiment's path: an `AffinePath` (score from the velocity) or an interpolant path
            (the model must be a ``velocity_score`` sampling field).
    """

    def __init__(self, config: SDEConfig, path: Path | None = None):
        affine = isinstance(path, AffinePath)
        if not affine and (config.diffusion in AFFINE_ONLY or config.last_step == "tweedie"):
            what = "last_step = \"tweedie\"" if config.last_step == "tweedie" else f"diffusion {config.diffusion!r}"
            raise ConfigError(f"{what} needs an affine [path] (alpha_t, sigma_t), not {type(path).__name__}",
                              ("last_step" if config.last_step == "tweedie" else "diffusion",))
        self.config, self.path = config, path

    @property
    def nfe_per_sample(self) -> int:
        c = self.config
        return c.steps * (2 if c.method == "heun" else 1) + (c.last_step != "none")

    def time_grid(self) -> Tensor:
        """The SDE grid ``(steps + 1,)`` (float64, CPU) from t0 to `SDEConfig.end`, then 1 if there is a last step."""
        c = self.config
        grid = torch.linspace(c.t0, c.end, c.steps + 1, dtype=torch.float64)
        return grid if c.last_step == "none" else torch.cat([grid, torch.ones(1, dtype=torch.float64)])

    def velocity_and_score(self, model: Field, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(v, s)`` at ``x (B, ...)``, ``t (B,)``: the model's own score, else the affine path's conversion."""
        if hasattr(model, "velocity_and_score"):
            return model.velocity_and_score(x, t, y)
        if not isinstance(self.path, AffinePath):
            raise ConfigError("an SDE on a stochastic interpolant path needs the score: train with objective "
                              "prediction = \"velocity_score\" (and backbone out_channels_mult = 2)", ("path",))
        v = model(x, t, y)
        return v, self.path.velocity_to_score(v, x, t)

    def drift(self, model: Field, x: Tensor, t: float, w: float, y: Tensor | None) -> Tensor:
        """``f = v + w s`` at the scalar time `t` (``v`` alone, no score evaluated, when ``w = 0``)."""
        tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        if w == 0.0:
            return model(x, tb, y)
        v, s = self.velocity_and_score(model, x, tb, y)
        return v + w * s

    def w(self, t: float) -> float:
        """``w(t)`` as a float; 0 when below `TINY`."""
        if self.config.norm == 0.0:
            return 0.0
        w = diffusion(self.config, torch.tensor(t, dtype=torch.float64), self.path)
        return 0.0 if w < TINY else w

    @torch.no_grad()
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        c, grid = self.config, self.time_grid().tolist()
        x = x_init
        traj = [x] if intermediates else None
        for k in range(c.steps):
            x = self.step(model, x, grid[k], grid[k + 1], y, generator)
            if traj is not None:
                traj.append(x)
        if c.last_step != "none":
            x = self.last(model, x, grid[-2], 1.0 - grid[-2], y)
            if traj is not None:
                traj.append(x)
        times = torch.tensor(grid, dtype=x_init.dtype, device=x_init.device) if intermediates else None
        return SolverResult(x=x, nfe=self.nfe_per_sample, trajectory=torch.stack(traj) if traj else None, times=times)

    def step(self, model: Field, x: Tensor, t: float, t_next: float, y: Tensor | None,
             generator: torch.Generator | None) -> Tensor:
        """One Euler-Maruyama or stochastic Heun step from ``t`` to ``t_next``."""
        h, w = t_next - t, self.w(t)
        noise = math.sqrt(2.0 * w * h) * gaussian(x, generator) if w > 0 else None
        if self.config.method == "euler":
            out = x + h * self.drift(model, x, t, w, y)
            return out if noise is None else out + noise
        xhat = x if noise is None else x + noise
        k1 = self.drift(model, xhat, t, w, y)
        k2 = self.drift(model, xhat + h * k1, t_next, self.w(t_next), y)
        return xhat + 0.5 * h * (k1 + k2)

    def last(self, model: Field, x: Tensor, t: float, h: float, y: Tensor | None) -> Tensor:
        """The noiseless last step from ``t`` to 1 (``mean``, ``euler`` or ``tweedie``)."""
        kind = self.config.last_step
        if kind == "mean":
            return x + h * self.drift(model, x, t, self.w(t), y)
        tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        v = model(x, tb, y)
        return x + h * v if kind == "euler" else self.path.velocity_to_x1(v, x, tb)


def gaussian(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normals shaped like `x`, drawn on the generator's device, returned on `x`'s."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def make_sde(config: SDEConfig, path: Path | None = None) -> SDESolver:
    """Solver factory for ``plugin = "sde"`` (needs the experiment's [path])."""
    if path is None:
        raise ConfigError("the sde solver needs the experiment's [path] (for the score)")
    if getattr(path, "manifold", None) is not None:
        raise ConfigError(f"the [path] lies on the {path.manifold.name} manifold; the sde solver's Euclidean steps "
                          f"would leave it: use plugin = \"riemannian_ode\"", ("plugin",))
    return SDESolver(config, path)
