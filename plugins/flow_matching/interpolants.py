r"""Stochastic interpolants (Albergo, Boffi and Vanden-Eijnden 2023) and Schrödinger-bridge CFM (Tong et al. 2024).

The path, in flowforge's time (t = 0 source, t = 1 data)::

    x_t = alpha_t x_1 + sigma_t x_0 + gamma_t z,      z ~ N(0, I) independent of (x_0, x_1),

with ``alpha, sigma`` from a scheduler and ``gamma_0 = gamma_1 = 0``:

* ``brownian``:  ``gamma_t = sqrt(a t (1 - t))``,  ``d gamma_t = a (1 - 2t) / (2 gamma_t)``;
* ``quadratic``: ``gamma_t = a t (1 - t)``,          ``d gamma_t = a (1 - 2t)``.

The regression target is the conditional velocity ``d/dt x_t = d alpha_t x_1 + d sigma_t x_0 + d gamma_t z``;
its conditional expectation given ``x_t`` is the marginal velocity ``b(x, t)`` whose ODE carries
``p_0`` to ``p_1`` through the marginals ``p_t``. The score of ``p_t`` is ``-E[z | x_t = x] / gamma_t``
(``p_t`` is a Gaussian mixture of width ``gamma_t`` around ``alpha x_1 + sigma x_0``), so a model
predicting ``eta(x, t) = E[z | x_t]`` next to the velocity (objective ``prediction = "velocity_score"``,
backbone ``out_channels_mult = 2``) gives the SDE samplers of sde.py their score; the SDE

    dx = [b + w(t) s] dt + sqrt(2 w(t)) dW

has the marginals ``p_t`` for any ``w >= 0`` (the forward SDE of stochastic interpolants).

``schrodinger_bridge`` (SB-CFM) is the brownian interpolant on the straight line (cond_ot,
``alpha = t, sigma = 1 - t``) with ``a = sigma_sb^2``::

    x_t = t x_1 + (1 - t) x_0 + sigma_sb sqrt(t (1 - t)) z,
    u_t = x_1 - x_0 + (1 - 2t) / (2 t (1 - t)) (x_t - t x_1 - (1 - t) x_0),

the Brownian bridge of ``sigma_sb W`` between the pair. Paired by the entropic OT plan with
``eps = 2 sigma_sb^2`` (objective ``coupling = "sinkhorn"``, the default ``sinkhorn_eps`` of this path),
its marginals are those of the Schrödinger bridge between ``p_0`` and ``p_1`` with reference
``sigma_sb W``; ``u_t`` is that bridge's probability-flow velocity after averaging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from torch import Tensor, nn

from core import rng
from core.interfaces import Path, PathSample, Scheduler
from core.nn import append_dims
from registry import ConfigError

from .scheduler import CondOTScheduler


@attrs.frozen
class InterpolantSample(PathSample):
    """A `PathSample` with the latent ``z (B, ...)`` and ``gamma (B,)`` of the draw."""

    z: Tensor = None
    gamma: Tensor = None


@attrs.define
class InterpolantConfig:
    """Options of the interpolant path.

    Attributes:
        gamma: "brownian" (gamma_t = sqrt(a t (1 - t))) or "quadratic" (gamma_t = a t (1 - t)).
        a: the scale a > 0 of gamma.
    """

    gamma: Literal["brownian", "quadratic"] = "brownian"
    a: float = 1.0

    def __attrs_post_init__(self) -> None:
        if not self.a > 0:
            raise ConfigError(f"expected a positive number, got {self.a!r}", ("a",))


@attrs.define
class SchrodingerConfig:
    """Options of the schrodinger_bridge path.

    Attributes:
        sigma: the reference Brownian motion's scale sigma_sb > 0 (gamma_t = sigma_sb sqrt(t (1 - t))).
    """

    sigma: float = 0.5

    def __attrs_post_init__(self) -> None:
        if not self.sigma > 0:
            raise ConfigError(f"expected a positive number, got {self.sigma!r}", ("sigma",))


class StochasticInterpolantPath(Path):
    """``x_t = alpha_t x_1 + sigma_t x_0 + gamma_t z`` (module docstring). Shapes: ``x (B, ...)``, ``t (B,)``."""

    #: The objective draws ``z`` per example and passes it to `sample`.
    latent_noise = True

    def __init__(self, scheduler: Scheduler, gamma: str = "brownian", a: float = 1.0):
        if gamma not in ("brownian", "quadratic"):
            raise ValueError(f"unknown gamma {gamma!r}")
        self.scheduler, self.kind, self.a = scheduler, gamma, float(a)

    @property
    def entropic_eps(self) -> float | None:
        """``2 a`` for the brownian gamma (``eps = 2 sigma_sb^2`` of SB-CFM); None otherwise."""
        return 2.0 * self.a if self.kind == "brownian" else None

    def gamma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(gamma_t, d gamma_t)``, each shaped like ``t`` (``d gamma`` is infinite at the ends for brownian)."""
        if self.kind == "brownian":
            g = torch.sqrt(self.a * t * (1 - t))
            return g, self.a * (1 - 2 * t) / (2 * g)
        return self.a * t * (1 - t), self.a * (1 - 2 * t)

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor, z: Tensor | None = None) -> InterpolantSample:
        """Draw ``x_t``; `z` ``(B, ...)`` is the latent noise (torch's global RNG when None)."""
        if z is None:
            z = torch.randn_like(x_1)
        s = self.scheduler(t)
        g, dg = self.gamma(t)
        a, b, da, db, gb, dgb = (append_dims(v, x_1.ndim) for v in (s.alpha_t, s.sigma_t, s.d_alpha_t,
                                                                      s.d_sigma_t, g, dg))
        return InterpolantSample(x_0=x_0, x_1=x_1, t=t, x_t=a * x_1 + b * x_0 + gb * z,
                                 target=da * x_1 + db * x_0 + dgb * z, z=z, gamma=g)

    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, *, dtype: torch.dtype | None = None,
                      draw: rng.ExampleRandom | None = None) -> Tensor:
        """``x_0 ~ N(0, I)`` ``(B, ...)`` (`core.rng.standard_normal`, stream ``"noise"``)."""
        return rng.standard_normal(shape, generator, device, dtype=dtype, draw=draw)

    def eta_to_score(self, eta: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t(x) = -eta / gamma_t`` from ``eta = E[z | x_t]`` ``(B, ...)``, ``t (B,)`` in (0, 1)."""
        return -eta / append_dims(self.gamma(t.to(eta.dtype))[0], eta.ndim)

    def __repr__(self) -> str:
        return f"StochasticInterpolantPath({self.scheduler!r}, gamma={self.kind!r}, a={self.a})"


def make_interpolant(config: InterpolantConfig, scheduler: Scheduler | None = None) -> StochasticInterpolantPath:
    """Path factory for ``plugin = "interpolant"`` (alpha, sigma of the [scheduler]; cond_ot without one)."""
    return StochasticInterpolantPath(scheduler or CondOTScheduler(), config.gamma, config.a)


def make_schrodinger_bridge(config: SchrodingerConfig, scheduler: Scheduler | None = None) -> StochasticInterpolantPath:
    """Path factory for ``plugin = "schrodinger_bridge"``: the straight line, so the [scheduler] must be cond_ot."""
    if scheduler is not None and not isinstance(scheduler, CondOTScheduler):
        raise ConfigError(f"the schrodinger_bridge path is the straight line x_t = t x_1 + (1 - t) x_0 + ...: "
                          f"it needs the cond_ot scheduler (or none), not {type(scheduler).__name__}")
    return StochasticInterpolantPath(CondOTScheduler(), "brownian", config.sigma ** 2)


class VelocityScore(nn.Module):
    """The sampling field of a ``velocity_score`` model: calls return the velocity, `score` the score.

    The wrapped model returns ``(B, 2C, ...)``: the velocity in the first ``C`` channels and
    ``eta = E[z | x_t]`` in the last ``C`` (for 2D data ``(B, 4)``: ``[v, eta]``).
    """

    def __init__(self, model: nn.Module, path: StochasticInterpolantPath):
        super().__init__()
        self.model, self.path = model, path

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return split_heads(self.model(x, t, y), x)[0]

    def velocity_and_score(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(velocity, score)``, each shaped like ``x``, from one model evaluation (``t`` in (0, 1))."""
        v, eta = split_heads(self.model(x, t, y), x)
        return v, self.path.eta_to_score(eta, x, t)


def split_heads(out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Split a ``(B, 2C, ...)`` output into two ``(B, C, ...)`` halves (a clear error otherwise)."""
    if out.ndim != x.ndim or out.shape[1] != 2 * x.shape[1] or out.shape[2:] != x.shape[2:]:
        raise ConfigError(f"prediction \"velocity_score\" needs a model whose output has twice the data's channels "
                          f"(got {tuple(out.shape)} for data {tuple(x.shape)}); set backbone.out_channels_mult = 2",
                          ("prediction",))
    return out[:, : x.shape[1]], out[:, x.shape[1]:]


def velocity_score_loss(pred: Tensor, ps: InterpolantSample) -> Tensor:
    """Per-sample ``mean |v_theta - u_t|^2 + mean |eta_theta - z|^2`` ``(B,)`` (the second is gamma^2-weighted DSM)."""
    v, eta = split_heads(pred, ps.x_t)
    dtype = torch.promote_types(pred.dtype, torch.float32)
    err = (v.to(dtype) - ps.target.to(dtype)).pow(2).reshape(v.shape[0], -1).mean(1)
    return err + (eta.to(dtype) - ps.z.to(dtype)).pow(2).reshape(v.shape[0], -1).mean(1)


__all__ = ["InterpolantConfig", "InterpolantSample", "SchrodingerConfig", "StochasticInterpolantPath",
           "VelocityScore", "make_interpolant", "make_schrodinger_bridge", "split_heads", "velocity_score_loss"]
