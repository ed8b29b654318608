"""Wrappers that turn a trained network into the velocity field an ODE solver integrates.

* `PredictionToVelocity`: a model predicting epsilon or x_1 (see path.py) as a velocity field.
* `ScheduleTransformedModel`: a velocity model trained under one scheduler, sampled under another
  without retraining (the scale-time transformation of Meta's flow_matching library,
  ``ScheduleTransformedModel``; Lipman et al. 2024, section 4.8).

Both are ``nn.Module``s called as ``field(x, t, y=None)`` with ``x (B, ...)`` and ``t (B,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.interfaces import Scheduler
from core.nn import append_dims

from .path import AffinePath


class PredictionToVelocity(nn.Module):
    """``model(x, t, y)`` predicting `prediction` ("epsilon" or "x1") as a velocity field.

    The conversions divide by ``alpha_t`` (epsilon) or ``sigma_t`` (x_1), which
    vanish at t = 0 and t = 1: the model is evaluated at ``t`` clamped to
    ``[eps, 1]`` (epsilon) or ``[0, 1 - eps]`` (x_1), as SiT samples from
    ``t0 = eps``; the solver's own time grid is unchanged.
    """

    def __init__(self, model: nn.Module, path: AffinePath, prediction: str, eps: float = 1e-3):
        super().__init__()
        if prediction not in ("epsilon", "x1"):
            raise ValueError(f"PredictionToVelocity converts epsilon or x1 predictions, got {prediction!r}")
        self.model, self.path, self.prediction, self.eps = model, path, prediction, float(eps)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        t = t.clamp(min=self.eps) if self.prediction == "epsilon" else t.clamp(max=1.0 - self.eps)
        pred = self.model(x, t, y)
        return self.path.convert(pred.to(x.dtype), x, t.to(x.dtype), self.prediction, "velocity")


class ScheduleTransformedModel(nn.Module):
    """A velocity model trained with `original` scheduler, as the velocity of the `new` scheduler's path.

    Two affine paths with the same source and data distributions are related by
    ``x̄_r = s_r x_{t_r}``: at new time ``r`` take the original time with the same
    signal-to-noise ratio, ``t_r = original.snr_inverse(alpha_r / sigma_r)``, and
    ``s_r = sigma_r / sigma_t = alpha_r / alpha_t``. Then

        ū_r(x) = (ds_r / s_r) x + s_r (dt_r/dr) u_t(x / s_r)

    with ``dt_r/dr = (sigma_r d alpha_r - alpha_r d sigma_r) / (s_r^2 (sigma_t d alpha_t - alpha_t d sigma_t))``
    (from ``d snr_t/dt dt = d snr_r/dr``) and ``ds_r = (d sigma_r - s_r d sigma_t dt_r) / sigma_t``
    (or its alpha form). Each quantity is computed in whichever of the alpha or the
    sigma form does not divide by a vanishing number, so the field is finite at
    both ends whenever the reparametrisation itself is smooth there.

    Integrating ``ū`` from r = 0 to 1 gives the same samples as integrating ``u``
    from t = 0 to 1 (``s_0 = s_1 = 1``) when both schedulers have ``alpha_0 = 0``,
    ``sigma_0 = 1`` and ``alpha_1 = 1``, ``sigma_1 = 0``. Singular pairs (``dt_r/dr``
    infinite at an end, e.g. original = polynomial with n > 1 at t = 0, or new =
    linear_vp at r = 1) give a non-finite field where a solver evaluates exactly
    there; choose a solver that does not (euler and midpoint never evaluate at
    t = 1) or a slightly smaller time interval.
    """

    def __init__(self, model: nn.Module, original: Scheduler, new: Scheduler):
        super().__init__()
        self.model, self.original, self.new = model, original, new

    def time_and_scale(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(t_r, s_r, dt_r/dr, ds_r/dr)`` at new times ``r`` (any shape)."""
        n = self.new(r)
        a_r, b_r, da_r, db_r = n.alpha_t, n.sigma_t, n.d_alpha_t, n.d_sigma_t
        t = self.original.snr_inverse(a_r / b_r)
        o = self.original(t)
        a_t, b_t, da_t, db_t = o.alpha_t, o.sigma_t, o.d_alpha_t, o.d_sigma_t
        use_alpha = a_t > b_t
        one = torch.ones_like(a_t)
        a_safe, b_safe = torch.where(use_alpha, a_t, one), torch.where(use_alpha, one, b_t)
        s = torch.where(use_alpha, a_r / a_safe, b_r / b_safe)
        dt = (b_r * da_r - a_r * db_r) / (s * s * (b_t * da_t - a_t * db_t))
        ds = torch.where(use_alpha, (da_r - s * da_t * dt) / a_safe, (db_r - s * db_t * dt) / b_safe)
        return t, s, dt, ds

    def forward(self, x: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        r = r.expand(x.shape[0]) if r.ndim == 0 else r
        t, s, dt, ds = self.time_and_scale(r.to(x.dtype))
        s_b, dt_b, ds_b = (append_dims(v, x.ndim) for v in (s, dt, ds))
        u = self.model(x / s_b, t, y)
        return (ds_b / s_b) * x + (dt_b * s_b) * u.to(x.dtype)
