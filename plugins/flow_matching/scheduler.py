"""Schedulers: ``t -> (alpha_t, sigma_t, d alpha_t/dt, d sigma_t/dt)`` with t=0 noise, t=1 data.

The affine path is ``x_t = alpha_t x_1 + sigma_t x_0``. Every scheduler here has
``alpha_t / sigma_t`` (the signal-to-noise ratio, SNR) strictly increasing on
(0, 1), so ``snr_inverse`` is well defined; ``snr_inverse(0) = 0`` and
``snr_inverse(inf) = 1`` (except VP, whose ``alpha_0 > 0``).

========== =============================== ============================ ===================================
name       alpha_t                         sigma_t                      boundaries (a_0, s_0, a_1, s_1)
========== =============================== ============================ ===================================
cond_ot    t                               1 - t                        (0, 1, 1, 0)
polynomial t^n                             1 - t^n                      (0, 1, 1, 0)
cosine     sin(pi t / 2)                   cos(pi t / 2)                (0, 1, 1, 0)
linear_vp  t                               sqrt(1 - t^2)                (0, 1, 1, 0)
vp         exp(-T_t / 2)                   sqrt(1 - exp(-T_t))          (exp(-(b+B)/4), sqrt(1-exp(-(b+B)/2)), 1, 0)
========== =============================== ============================ ===================================

with ``T_t = (B - b) (1 - t)^2 / 2 + b (1 - t)`` for ``b = beta_min``, ``B = beta_max``
(the VP-SDE of Song et al. in the t=1-data convention, as in Meta's flow_matching).
``cond_ot`` and ``polynomial`` are convex (``sigma_t = 1 - alpha_t``, ``kappa_t = alpha_t``)
and provide ``kappa_inverse``.

Every formula is written to be exact in float64 (no cancellation near the ends)
and ``snr_inverse`` accepts ``0`` and ``inf``.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor

from core.interfaces import ConvexScheduler, Scheduler, SchedulerOutput
from registry import ConfigError


def _ratio_to_kappa(snr: Tensor) -> Tensor:
    """``snr / (1 + snr)`` with ``inf -> 1``."""
    return torch.where(torch.isinf(snr), torch.ones_like(snr), snr / (1.0 + snr))


class CondOTScheduler(ConvexScheduler):
    """Conditional optimal transport (rectified flow): ``alpha_t = t``, ``sigma_t = 1 - t``.

    ``d alpha/dt = 1``, ``d sigma/dt = -1``; ``snr = t / (1 - t)`` so
    ``snr_inverse(r) = r / (1 + r)``; ``kappa_t = t`` so ``kappa_inverse(k) = k``.
    """

    boundaries = (0.0, 1.0, 1.0, 0.0)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        return SchedulerOutput(alpha_t=t, sigma_t=1 - t, d_alpha_t=torch.ones_like(t), d_sigma_t=-torch.ones_like(t))

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return _ratio_to_kappa(snr)

    def kappa_inverse(self, kappa: Tensor) -> Tensor:
        return kappa

    def __repr__(self) -> str:
        return "CondOTScheduler()"


@attrs.define
class PolynomialConfig:
    """Options of the polynomial scheduler.

    Attributes:
        n: the exponent in ``alpha_t = t^n`` (n = 1 is cond_ot; n >= 1 keeps the velocity finite at t = 0).
    """

    n: float = 2.0

    def __attrs_post_init__(self) -> None:
        if not self.n > 0:
            raise ConfigError(f"expected a positive exponent, got {self.n}", ("n",))


class PolynomialConvexScheduler(ConvexScheduler):
    """``alpha_t = t^n``, ``sigma_t = 1 - t^n``: ``d alpha = n t^(n-1) = -d sigma``.

    ``kappa_inverse(k) = k^(1/n)``; ``snr_inverse(r) = (r / (1 + r))^(1/n)``.
    """

    boundaries = (0.0, 1.0, 1.0, 0.0)

    def __init__(self, config: PolynomialConfig | None = None):
        self.config = config or PolynomialConfig()
        self.n = float(self.config.n)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        n = self.n
        a = t ** n
        da = n * t ** (n - 1.0)
        return SchedulerOutput(alpha_t=a, sigma_t=1 - a, d_alpha_t=da, d_sigma_t=-da)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return self.kappa_inverse(_ratio_to_kappa(snr))

    def kappa_inverse(self, kappa: Tensor) -> Tensor:
        return kappa ** (1.0 / self.n)

    def __repr__(self) -> str:
        return f"PolynomialConvexScheduler(n={self.n})"


class CosineScheduler(Scheduler):
    """``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)`` (variance preserving, not convex).

    ``d alpha = (pi/2) cos(pi t/2)``, ``d sigma = -(pi/2) sin(pi t/2)``;
    ``snr = tan(pi t / 2)`` so ``snr_inverse(r) = (2/pi) atan(r)``.
    """

    boundaries = (0.0, 1.0, 1.0, 0.0)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        h = 0.5 * math.pi
        s, c = torch.sin(h * t), torch.cos(h * t)
        return SchedulerOutput(alpha_t=s, sigma_t=c, d_alpha_t=h * c, d_sigma_t=-h * s)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return torch.atan(snr) * (2.0 / math.pi)

    def __repr__(self) -> str:
        return "CosineScheduler()"


class LinearVPScheduler(Scheduler):
    """``alpha_t = t``, ``sigma_t = sqrt(1 - t^2)`` (variance preserving, linear signal).

    ``d alpha = 1``, ``d sigma = -t / sqrt(1 - t^2)`` (``-inf`` at t = 1);
    ``snr = t / sqrt(1 - t^2)`` so ``snr_inverse(r) = r / sqrt(1 + r^2) = 1 / sqrt(1 + r^-2)``.
    """

    boundaries = (0.0, 1.0, 1.0, 0.0)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        sigma = torch.sqrt((1 - t) * (1 + t))
        return SchedulerOutput(alpha_t=t, sigma_t=sigma, d_alpha_t=torch.ones_like(t), d_sigma_t=-t / sigma)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return torch.rsqrt(1.0 + torch.reciprocal(snr * snr))

    def __repr__(self) -> str:
        return "LinearVPScheduler()"


@attrs.define
class VPConfig:
    """Options of the vp scheduler.

    Attributes:
        beta_min: the noise rate ``beta`` at the data end (t = 1).
        beta_max: the noise rate ``beta`` at the noise end (t = 0); ``beta_max >= beta_min``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __attrs_post_init__(self) -> None:
        if self.beta_min < 0:
            raise ConfigError(f"expected a non-negative number, got {self.beta_min}", ("beta_min",))
        if not self.beta_max >= self.beta_min or self.beta_max <= 0:
            raise ConfigError(f"expected a positive number >= beta_min = {self.beta_min}, got {self.beta_max}",
                              ("beta_max",))


class VPScheduler(Scheduler):
    """The variance-preserving SDE schedule (Song et al. 2021) with linear ``beta``.

    With ``s = 1 - t``, ``T_t = (B - b) s^2 / 2 + b s`` and ``dT/dt = -((B - b) s + b)``:

        alpha_t = exp(-T_t / 2),            d alpha = -dT/dt alpha_t / 2
        sigma_t = sqrt(1 - exp(-T_t)),      d sigma = dT/dt exp(-T_t) / (2 sigma_t)

    ``alpha_0 = exp(-(b + B)/4) > 0`` (about 0.0066 for the defaults): the source
    is only approximately pure noise, as in the VP-SDE. ``snr^2 = 1 / (e^T - 1)``,
    so ``snr_inverse(r) = 1 - s`` with ``T = log(1 + r^-2)`` and
    ``s = 2 T / (b + sqrt(b^2 + 2 (B - b) T))`` (may be below 0 for ``r < snr_0``).
    """

    def __init__(self, config: VPConfig | None = None):
        self.config = config or VPConfig()
        self.b, self.B = float(self.config.beta_min), float(self.config.beta_max)
        t0 = 0.5 * (self.B + self.b)
        self.boundaries = (math.exp(-0.5 * t0), math.sqrt(-math.expm1(-t0)), 1.0, 0.0)

    def __call__(self, t: Tensor) -> SchedulerOutput:
        b, d = self.b, self.B - self.b
        s = 1 - t
        T = 0.5 * d * s * s + b * s
        dT = -(d * s + b)
        alpha = torch.exp(-0.5 * T)
        sigma = torch.sqrt(-torch.expm1(-T))
        return SchedulerOutput(alpha_t=alpha, sigma_t=sigma, d_alpha_t=-0.5 * dT * alpha,
                               d_sigma_t=0.5 * dT * torch.exp(-T) / sigma)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        b, d = self.b, self.B - self.b
        T = torch.log1p(torch.reciprocal(snr * snr))
        den = b + torch.sqrt(b * b + 2.0 * d * T)
        s = torch.where(T == 0, torch.zeros_like(T), 2.0 * T / torch.where(den == 0, torch.ones_like(den), den))
        s = torch.where(torch.isinf(T), torch.full_like(T, math.inf), s)  # snr = 0 is reached only as t -> -inf
        return 1 - s

    def __repr__(self) -> str:
        return f"VPScheduler(beta_min={self.b}, beta_max={self.B})"


def make_polynomial(config: PolynomialConfig) -> PolynomialConvexScheduler:
    return PolynomialConvexScheduler(config)


def make_vp(config: VPConfig) -> VPScheduler:
    return VPScheduler(config)


def make_cond_ot() -> CondOTScheduler:
    """Scheduler factory for ``plugin = "cond_ot"`` (no options)."""
    return CondOTScheduler()


def make_cosine() -> CosineScheduler:
    """Scheduler factory for ``plugin = "cosine"`` (no options)."""
    return CosineScheduler()


def make_linear_vp() -> LinearVPScheduler:
    """Scheduler factory for ``plugin = "linear_vp"`` (no options)."""
    return LinearVPScheduler()
