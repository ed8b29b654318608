"""What the sigma-space diffusion solvers share: the grid options, the denoiser and the sampling loop.

The model of a ``gaussian_diffusion`` path predicts epsilon, x_start or v (plus
variance channels, which these solvers ignore) at a VP state
``x = alpha x_start + sigma_vp eps``. `Denoiser` turns any of them into the
data prediction at a VE sigma ``s`` (``alpha = 1/sqrt(1+s^2)``, ``sigma_vp = s alpha``):

    epsilon: x0 = (x - sigma_vp out) / alpha,   x_start: x0 = out,   v: x0 = alpha x - sigma_vp out,

optionally clamped to [-1, 1] (``clip_denoised``) or dynamically thresholded
(Saharia et al. 2022: per example ``q`` = the ``ratio`` quantile of ``|x0|``, clamped to
``[1, sample_max_value]``; ``x0 <- clamp(x0, -q, q) / q``). The model sees flowforge
time ``t = 1 - (s_k + 1) / T`` of the (fractional) step ``s_k`` (the same map as
`plugins.ddpm.diffusion.step_to_time`).

A solver's state is the VP sample; it starts from ``x_init ~ N(0, I)`` at
``sigmas[0]``, and each solver class implements `SigmaSolver.run`.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from core.interfaces import Field, Solver, SolverResult
from registry import ConfigError

from .diffusion import GaussianDiffusion
from .path import diffusion_of
from .spacing import sigma_grid


@attrs.define
class GridConfig:
    """Options every sigma-space diffusion solver shares.

    Attributes:
        steps: number of solver steps n (the grid has n sigmas plus the final one).
        spacing: "leading", "trailing" or "linspace" (diffusers' timestep_spacing); ignored with karras_sigmas.
        karras_sigmas: Karras et al.'s rho = 7 sigmas between the process's extreme sigmas.
        final_sigma: "zero" (end exactly at the data prediction) or "sigma_min" (the smallest trained sigma).
        steps_offset: added to every "leading" step (diffusers' steps_offset; Stable Diffusion uses 1).
        clip_denoised: clamp the data prediction to [-1, 1].
        thresholding: dynamic thresholding of the data prediction (Imagen).
        dynamic_thresholding_ratio: the quantile of |x0| used as the threshold.
        sample_max_value: the largest threshold.
    """

    steps: int = 20
    spacing: Literal["leading", "trailing", "linspace"] = "linspace"
    karras_sigmas: bool = False
    final_sigma: Literal["zero", "sigma_min"] = "zero"
    steps_offset: int = 0
    clip_denoised: bool = False
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def __attrs_post_init__(self) -> None:
        checks = [(self.steps >= 1, "steps", "a positive number of steps"),
                  (self.steps_offset >= 0, "steps_offset", "a non-negative offset"),
                  (0.0 < self.dynamic_thresholding_ratio <= 1.0, "dynamic_thresholding_ratio", "a quantile in (0, 1]"),
                  (self.sample_max_value >= 1.0, "sample_max_value", "a threshold >= 1")]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, key)!r}", (key,))
        if self.clip_denoised and self.thresholding:
            raise ConfigError("choose clip_denoised or thresholding, not both", ("thresholding",))


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's dynamic thresholding of ``x0 (B, ...)`` (see the module docstring)."""
    flat = x0.reshape(x0.shape[0], -1)
    q = torch.quantile(flat.abs(), ratio, dim=1).clamp(1.0, max_value)[:, None]
    return (torch.maximum(torch.minimum(flat, q), -q) / q).reshape(x0.shape)


class Denoiser:
    """``x0(x, s, step)``: the data prediction of ``model`` at the VP state ``x (B, ...)`` of VE sigma ``s``."""

    def __init__(self, model: Field, diffusion: GaussianDiffusion, config: GridConfig, y: Tensor | None = None):
        self.model, self.diffusion, self.config, self.y = model, diffusion, config, y
        self.calls = 0

    def time(self, step: Tensor, x: Tensor) -> Tensor:
        """flowforge time ``(B,)`` of a (fractional) training step."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = 1.0 - (step.to(torch.float64) + 1.0) / self.diffusion.original_steps
        return t.to(dtype=dtype, device=x.device).expand(x.shape[0])

    def __call__(self, x: Tensor, sigma: Tensor, step: Tensor) -> Tensor:
        self.calls += 1
        out = self.diffusion.split_output(self.model(x, self.time(step, x), self.y), x)[0]
        alpha = (1.0 / torch.sqrt(1.0 + sigma ** 2)).to(x.dtype)
        sigma_vp = sigma.to(x.dtype) * alpha
        prediction = self.diffusion.prediction
        if prediction == "epsilon":
            x0 = (x - sigma_vp * out) / alpha
        elif prediction == "x_start":
            x0 = out
        else:
            x0 = alpha * x - sigma_vp * out
        c = self.config
        if c.clip_denoised:
            return x0.clamp(-1.0, 1.0)
        if c.thresholding:
            return dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return x0


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like `x`, drawn with `generator` on its device."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


class SigmaSolver(Solver):
    """Base of the DPM-Solver++, UniPC and EDM solvers: grid, denoiser and trajectory bookkeeping."""

    method = ""
    layout = "multistep"

    def __init__(self, config: GridConfig, path: Any = None):
        self.config = config
        self.diffusion = diffusion_of(path, f"the {self.method} solver")
        self.steps, self.sigmas = sigma_grid(self.diffusion.tables["alphas_cumprod"], config.steps, config.spacing,
                                             layout=self.layout, karras=config.karras_sigmas,
                                             final_sigma=config.final_sigma, steps_offset=config.steps_offset)

    def run(self, denoise: Denoiser, x: Tensor, generator: torch.Generator | None, traj: list[Tensor] | None) -> Tensor:
        """Integrate from ``sigmas[0]`` to ``sigmas[-1]``; append every step's state to `traj` when given."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False) -> SolverResult:
        denoise = Denoiser(model, self.diffusion, self.config, y)
        traj = [x_init] if intermediates else None
        x = self.run(denoise, x_init, generator, traj)
        times = None
        if intermediates:
            times = torch.cat([1.0 - (self.steps + 1.0) / self.diffusion.original_steps,
                               torch.ones(1, dtype=torch.float64)]).to(x.dtype)
        return SolverResult(x=x, nfe=denoise.calls, trajectory=torch.stack(traj) if traj is not None else None,
                            times=times)
