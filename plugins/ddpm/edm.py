"""EDM samplers (Karras et al. 2022) on a DDPM process: Euler and Heun with churn, and Euler ancestral.

They integrate in the variance-exploding state ``z = x / alpha = x_start + s eps`` with
the denoiser ``D(z, s)`` (the data prediction of `plugins.ddpm.sampling.Denoiser` at
``x = alpha z``) and return the VP state (``alpha = 1`` at ``s = 0``). Algorithm 2, step
``i`` from ``s_i`` to ``s_{i+1}``:

    gamma = min(S_churn / n, sqrt(2) - 1) if S_tmin <= s_i <= S_tmax else 0
    s_hat = s_i (1 + gamma);  z_hat = z + sqrt(s_hat^2 - s_i^2) S_noise eps     (churn)
    d = (z_hat - D(z_hat, s_hat)) / s_hat;  z' = z_hat + (s_{i+1} - s_hat) d    (Euler)
    Heun, if s_{i+1} > 0:  d' = (z' - D(z', s_{i+1})) / s_{i+1};  z' = z_hat + (s_{i+1} - s_hat) (d + d') / 2

The model is called at the step of ``s_hat`` (`plugins.ddpm.spacing.sigma_to_step`; the grid's
own step when ``gamma = 0``). Euler ancestral (k-diffusion's ``get_ancestral_step``):
``s_up = min(s_{i+1}, eta sqrt(s_{i+1}^2 (s_i^2 - s_{i+1}^2) / s_i^2))``, ``s_down = sqrt(s_{i+1}^2 - s_up^2)``,
``z' = z + (s_down - s_i) d + s_up eps``. All three use diffusers' Euler grid (`spacing`, layout "euler").
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor

from registry import ConfigError

from .sampling import Denoiser, GridConfig, SigmaSolver, noise_like
from .spacing import sigma_to_step, train_sigmas


@attrs.define
class EDMConfig(GridConfig):
    """Options of the euler and heun solvers (GridConfig's plus Karras et al.'s churn).

    Attributes:
        s_churn: total stochasticity S_churn (0: the deterministic probability-flow ODE).
        s_tmin: churn only for sigmas at or above this.
        s_tmax: churn only for sigmas at or below this.
        s_noise: scale S_noise of the churn noise (slightly above 1 offsets denoiser bias).
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key in ("s_churn", "s_tmin", "s_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"expected a non-negative {key}, got {getattr(self, key)}", (key,))
        if self.s_tmax < self.s_tmin:
            raise ConfigError(f"s_tmax ({self.s_tmax}) must not be below s_tmin ({self.s_tmin})", ("s_tmax",))


@attrs.define
class AncestralEulerConfig(GridConfig):
    """Options of the euler_ancestral solver.

    Attributes:
        eta: ancestral noise scale (1: the DDPM posterior's; 0: the Euler ODE step).
        s_noise: scale of the added noise.
    """

    eta: float = 1.0
    s_noise: float = 1.0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key in ("eta", "s_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"expected a non-negative {key}, got {getattr(self, key)}", (key,))


class _VESolver(SigmaSolver):
    layout = "euler"

    def __init__(self, config: GridConfig, path: Any = None):
        super().__init__(config, path)
        self.table = train_sigmas(self.diffusion.tables["alphas_cumprod"])

    def denoised(self, denoise: Denoiser, z: Tensor, sigma: Tensor, step: Tensor) -> Tensor:
        """``D(z, s)`` in VE coordinates."""
        return denoise(z / torch.sqrt(1.0 + sigma ** 2).to(z.dtype), sigma, step)

    def run(self, denoise: Denoiser, x: Tensor, generator: torch.Generator | None, traj: list[Tensor] | None) -> Tensor:
        sig = self.sigmas.to(x.device)
        z = x * torch.sqrt(1.0 + sig[0] ** 2).to(x.dtype)
        for i in range(self.config.steps):
            z = self.step(denoise, z, i, sig, generator)
            if traj is not None:
                traj.append(z / torch.sqrt(1.0 + sig[i + 1] ** 2).to(z.dtype))
        return z / torch.sqrt(1.0 + sig[-1] ** 2).to(z.dtype)

    def step(self, denoise: Denoiser, z: Tensor, i: int, sig: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError


class EulerSolver(_VESolver):
    """See the module docstring (``euler``)."""

    method = "euler"
    heun = False

    def __init__(self, config: EDMConfig | None = None, path: Any = None):
        super().__init__(config or EDMConfig(), path)

    def step(self, denoise: Denoiser, z: Tensor, i: int, sig: Tensor, generator: torch.Generator | None) -> Tensor:
        c, s, s_next = self.config, sig[i], sig[i + 1]
        gamma = min(c.s_churn / c.steps, math.sqrt(2.0) - 1.0) if c.s_tmin <= float(s) <= c.s_tmax else 0.0
        step = self.steps[i]
        if gamma > 0:
            s_hat = s * (1.0 + gamma)
            z = z + torch.sqrt(s_hat ** 2 - s ** 2).to(z.dtype) * c.s_noise * noise_like(z, generator)
            step = sigma_to_step(s_hat.reshape(1).cpu(), self.table)[0]
            s = s_hat
        d = (z - self.denoised(denoise, z, s, step)) / s.to(z.dtype)
        z_next = z + (s_next - s).to(z.dtype) * d
        if self.heun and s_next > 0:
            d_next = (z_next - self.denoised(denoise, z_next, s_next, self.steps[i + 1])) / s_next.to(z.dtype)
            z_next = z + (s_next - s).to(z.dtype) * (0.5 * (d + d_next))
        return z_next


class HeunSolver(EulerSolver):
    """See the module docstring (``heun``); ``2n - 1`` model calls (the last step to sigma = 0 is Euler)."""

    method = "heun"
    heun = True


class EulerAncestralSolver(_VESolver):
    """See the module docstring (``euler_ancestral``)."""

    method = "euler_ancestral"

    def __init__(self, config: AncestralEulerConfig | None = None, path: Any = None):
        super().__init__(config or AncestralEulerConfig(), path)

    def step(self, denoise: Denoiser, z: Tensor, i: int, sig: Tensor, generator: torch.Generator | None) -> Tensor:
        c, s, s_next = self.config, sig[i], sig[i + 1]
        s_up = torch.minimum(s_next, c.eta * torch.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        s_down = torch.sqrt(s_next ** 2 - s_up ** 2)
        d = (z - self.denoised(denoise, z, s, self.steps[i])) / s.to(z.dtype)
        z = z + (s_down - s).to(z.dtype) * d
        if s_next > 0 and s_up > 0:
            z = z + (s_up * c.s_noise).to(z.dtype) * noise_like(z, generator)
        return z


def make_euler(config: EDMConfig | None = None, path: Any = None) -> EulerSolver:
    """Solver factory for ``plugin = "euler"``."""
    return EulerSolver(config, path)


def make_euler_ancestral(config: AncestralEulerConfig | None = None, path: Any = None) -> EulerAncestralSolver:
    """Solver factory for ``plugin = "euler_ancestral"``."""
    return EulerAncestralSolver(config, path)


def make_heun(config: EDMConfig | None = None, path: Any = None) -> HeunSolver:
    """Solver factory for ``plugin = "heun"``."""
    return HeunSolver(config, path)
