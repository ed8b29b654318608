"""The probability-flow ODE of a ``gaussian_diffusion`` process as a flowforge velocity field.

The discrete process gives the VE noise levels ``sigma_k = sqrt((1 - abar_k) / abar_k)`` at
``t_k = 1 - (k + 1) / T`` (``k = T-1 .. 0``, so ``t_{T-1} = 0``), and ``sigma = 0`` at ``t = 1``
(the data). Between these knots ``sigma(t)`` is the monotone cubic Hermite interpolant (PCHIP,
Fritsch and Carlson 1980: continuously differentiable, so the velocity below is continuous and
Runge-Kutta methods keep their order), ``alpha(t) = 1 / sqrt(1 + sigma^2)``,
and the VP state is ``x = alpha (x_start + sigma eps)``. With ``xbar = x / alpha`` the flow is
``d xbar / d sigma = eps`` (Song et al. 2021; Karras et al. 2022, eq. 4), i.e. in ``t``

    dx/dt = (alpha'/alpha) x + alpha sigma'(t) eps_hat(x, t),      alpha'/alpha = -sigma sigma' / (1 + sigma^2),

where ``eps_hat = (x / alpha - x0_hat) / sigma`` comes from the model's data prediction
(`plugins.ddpm.sampling.Denoiser`: epsilon, x_start or v; variance channels ignored).
On the last interval ``(1 - 1/T, 1]``, which no training step covers, the model is evaluated
at step 0 (as DDIM's last step uses step 0's epsilon down to the data).

DDIM with ``eta = 0`` is the Euler method of ``d xbar / d sigma = eps`` on the kept steps, so the
``ode`` solver on this field and DDIM converge to the same samples as their step counts grow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.interfaces import Field

from .diffusion import GaussianDiffusion
from .sampling import Denoiser, GridConfig
from .spacing import train_sigmas


def _edge_slope(h0: float, h1: float, m0: Tensor, m1: Tensor) -> Tensor:
    d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    d = torch.where(torch.sign(d) != torch.sign(m0), torch.zeros_like(d), d)
    return torch.where((torch.sign(m0) != torch.sign(m1)) & (d.abs() > 3 * m0.abs()), 3 * m0, d)


def pchip_slopes(y: Tensor, h: float) -> Tensor:
    """Fritsch-Carlson slopes ``(N,)`` of the monotone cubic through ``y (N,)`` on a uniform grid of spacing `h`:
    the harmonic mean of the neighbouring secants (0 at a local extremum), one-sided three-point ends."""
    m = (y[1:] - y[:-1]) / h
    inner = torch.where((torch.sign(m[1:]) != torch.sign(m[:-1])) | (m[1:] == 0) | (m[:-1] == 0),
                        torch.zeros_like(m[1:]), 2.0 / (1.0 / m[:-1] + 1.0 / m[1:]))
    first, last = _edge_slope(h, h, m[0], m[1]), _edge_slope(h, h, m[-1], m[-2])
    return torch.cat([first[None], inner, last[None]])


class ProbabilityFlow(nn.Module):
    """``v(x, t, y)``: the velocity ``dx/dt`` of the probability-flow ODE of `model` (``x (B, ...)``, ``t (B,)``)."""

    def __init__(self, model: Field, diffusion: GaussianDiffusion):
        super().__init__()
        self.model, self.diffusion = model, diffusion
        self.knots = torch.cat([torch.zeros(1, dtype=torch.float64), train_sigmas(diffusion.tables["alphas_cumprod"])])
        self.values = self.knots.flip(0)  # sigma at t = j / T, j = 0 .. T (decreasing to 0 at the data)
        self.slopes = pchip_slopes(self.values, 1.0 / (self.values.shape[0] - 1))

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(``sigma(t)``, ``d sigma / dt``), float64 ``(B,)``: the monotone cubic through the knots."""
        T = self.knots.shape[0] - 1
        pos = (t.to(torch.float64) * T).clamp(0, T)  # knots in increasing t: index j at t = j / T
        j = pos.floor().long().clamp(max=T - 1)
        s, h = pos - j, 1.0 / T
        y, d = self.values.to(t.device), self.slopes.to(t.device)
        y0, y1, d0, d1 = y[j], y[j + 1], d[j], d[j + 1]
        value = (2 * s**3 - 3 * s**2 + 1) * y0 + (s**3 - 2 * s**2 + s) * h * d0 + (3 * s**2 - 2 * s**3) * y1 \
            + (s**3 - s**2) * h * d1
        slope = (6 * s**2 - 6 * s) * (y0 - y1) / h + (3 * s**2 - 4 * s + 1) * d0 + (3 * s**2 - 2 * s) * d1
        return value, slope

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        sigma, d_sigma = self.sigma(t)
        step = ((1.0 - t.to(torch.float64)) * self.diffusion.num_timesteps - 1.0).clamp(min=0.0)
        sigma_m = torch.maximum(sigma, self.knots[1].to(sigma.device))
        shape = (-1,) + (1,) * (x.ndim - 1)
        x0 = Denoiser(self.model, self.diffusion, GridConfig(), y)(x, sigma_m.reshape(shape), step)
        sigma, d_sigma, sigma_m = (v.reshape(shape).to(x.dtype) for v in (sigma, d_sigma, sigma_m))
        alpha, alpha_m = torch.rsqrt(1.0 + sigma ** 2), torch.rsqrt(1.0 + sigma_m ** 2)
        eps = (x / alpha_m - x0) / sigma_m
        return -(sigma * d_sigma / (1.0 + sigma ** 2)) * x + alpha * d_sigma * eps
