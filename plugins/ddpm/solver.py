"""DDPM samplers (solvers): ancestral sampling and DDIM, over a respaced ``gaussian_diffusion`` process.

Both start from ``x_init ~ N(0, I)`` as the state at the last kept step and
step down through the kept steps ``k_{n-1} > ... > k_0`` (``respacing``, see
`plugins.ddpm.diffusion.space_timesteps`; the betas are recomputed from the
kept ``abar``). At each step the model is called once, as
``model(x, t, y)`` with ``t = 1 - (k + 1) / T`` of the original step ``k``,
and its output gives ``x_start`` (clamped to [-1, 1] with ``clip_denoised``):

* ``ddpm_ancestral``: ``x <- mean + sigma z`` with ``p(x_{k-1} | x_k)`` from the
  path's variance type (guided-diffusion's ``p_sample``); no noise at the last step. Given a
  `ClassifierGuidance` field it samples as guided-diffusion's ``p_sample`` with ``cond_fn``
  (``condition_mean``): the unguided model's mean plus ``s Sigma grad log p(y | x_k)``, ``Sigma`` that
  step's variance; the other solvers use the guided epsilon (``condition_score``).
* ``ddim``: ``eps`` re-derived from ``x_start``, then
  ``x <- sqrt(abar_prev) x_start + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` with
  ``sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev)``
  (``eta = 0``: deterministic; ``eta = 1``: the ancestral fixed-small step).

``nfe`` is the number of kept steps. Trajectories hold ``x_init`` and the state
after every step; their times are the states' flowforge times (the last one 1).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from core.interfaces import Field, Solver, SolverResult
from registry import ConfigError

from .classifier_guidance import ClassifierGuidance
from .diffusion import GaussianDiffusion, randn_like
from .path import diffusion_of


@attrs.define
class AncestralConfig:
    """Options of the ddpm_ancestral solver (guided-diffusion's p_sample_loop).

    Attributes:
        respacing: kept steps: "" (all T), "ddimN" (every s-th step, exactly N) or section counts "a,b,c"
            (guided-diffusion's timestep_respacing).
        clip_denoised: clamp the predicted x_start to [-1, 1] before computing the step.
    """

    respacing: str = ""
    clip_denoised: bool = True


@attrs.define
class DDIMConfig:
    """Options of the ddim solver (guided-diffusion's ddim_sample_loop).

    Attributes:
        respacing: kept steps: "" (all T), "ddimN" (every s-th step, exactly N) or section counts "a,b,c"
            (guided-diffusion's timestep_respacing; use_ddim with "ddim50" is the usual 50-step DDIM).
        eta: noise scale (0: deterministic DDIM; 1: the ancestral fixed-small variance).
        clip_denoised: clamp the predicted x_start to [-1, 1] before computing the step.
    """

    respacing: str = ""
    eta: float = 0.0
    clip_denoised: bool = True

    def __attrs_post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"expected a non-negative eta, got {self.eta}", ("eta",))


def respaced(path: Any, respacing: str, component: str) -> GaussianDiffusion:
    """The path's process over the kept steps; ConfigError (key ``respacing``) when impossible."""
    diffusion = diffusion_of(path, component)
    try:
        return diffusion.respaced(respacing)
    except ValueError as exc:
        raise ConfigError(str(exc), ("respacing",)) from None


class _DiffusionSolver(Solver):
    method = ""
    #: classifier guidance by the mean shift s Sigma g (guided-diffusion's condition_mean) instead of eps
    condition_mean = False

    def __init__(self, config: Any, path: Any = None):
        self.config = config
        self.diffusion = respaced(path, config.respacing, f"the {self.method} solver")

    def step(self, output: Tensor, x: Tensor, k: Tensor, i: int, generator: torch.Generator | None,
             shift: Tensor | None = None) -> Tensor:
        """``x`` at the next kept step from the model's `output` at step `k` (kept index `i`); `shift`: the
        classifier's ``s grad log p(y | x)`` for `condition_mean` solvers."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        d = self.diffusion
        x = x_init
        traj = [x] if intermediates else None
        guidance = model if self.condition_mean and isinstance(model, ClassifierGuidance) and y is not None else None
        field = model if guidance is None else guidance.model
        for i in reversed(range(d.num_timesteps)):
            k = d.steps(i, x.shape[0], x.device)
            t = d.model_time(k, x)
            shift = None if guidance is None or not guidance.scale else guidance.scale * guidance.gradient(x, t, y)
            x = self.step(field(x, t, y), x, k, i, generator, shift)
            if traj is not None:
                traj.append(x)
        times = None
        if intermediates:  # the state before step i sits at step i's time; the final one at t = 1
            grid = d.table("model_time", x.device, x.dtype).flip(0)
            times = torch.cat([grid, grid.new_ones(1)])
        return SolverResult(x=x, nfe=d.num_timesteps, trajectory=torch.stack(traj) if traj is not None else None,
                            times=times)


class AncestralSolver(_DiffusionSolver):
    """See the module docstring (``ddpm_ancestral``)."""

    method = "ddpm_ancestral"
    condition_mean = True

    def __init__(self, config: AncestralConfig | None = None, path: Any = None):
        super().__init__(config or AncestralConfig(), path)

    def step(self, output: Tensor, x: Tensor, k: Tensor, i: int, generator: torch.Generator | None,
             shift: Tensor | None = None) -> Tensor:
        p = self.diffusion.p_mean_variance(output, x, k, self.config.clip_denoised)
        mean = p.mean if shift is None else p.mean + torch.exp(p.log_variance) * shift
        if i == 0:
            return mean
        return mean + torch.exp(0.5 * p.log_variance) * randn_like(x, generator)


class DDIMSolver(_DiffusionSolver):
    """See the module docstring (``ddim``)."""

    method = "ddim"

    def __init__(self, config: DDIMConfig | None = None, path: Any = None):
        super().__init__(config or DDIMConfig(), path)

    def step(self, output: Tensor, x: Tensor, k: Tensor, i: int, generator: torch.Generator | None,
             shift: Tensor | None = None) -> Tensor:
        d, eta = self.diffusion, self.config.eta
        x_start = d.xstart_from_output(output, x, k, self.config.clip_denoised)
        eps = d.eps_from_xstart(x, k, x_start)
        ab_prev = d.extract("alphas_cumprod_prev", k, x)
        sigma = d.ddim_sigma(k, eta, x)
        mean = x_start * ab_prev.sqrt() + (1.0 - ab_prev - sigma ** 2).sqrt() * eps
        if i == 0 or eta == 0:
            return mean
        return mean + sigma * randn_like(x, generator)


def make_ddim(config: DDIMConfig | None = None, path: Any = None) -> DDIMSolver:
    """Solver factory for ``plugin = "ddim"``."""
    return DDIMSolver(config, path)


def make_ddpm_ancestral(config: AncestralConfig | None = None, path: Any = None) -> AncestralSolver:
    """Solver factory for ``plugin = "ddpm_ancestral"``."""
    return AncestralSolver(config, path)
