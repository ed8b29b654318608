"""The affine probability path ``x_t = alpha_t x_1 + sigma_t x_0`` over any scheduler.

``x_0 ~ N(0, I)`` is the source (noise, also called epsilon) and ``x_1`` the
data. A model may predict any of three quantities, related in closed form at
every ``(x_t, t)`` through the scheduler's ``alpha, sigma, d alpha, d sigma``
(all shaped like ``t``, broadcast over the data dimensions):

    velocity  v = d alpha x_1 + d sigma x_0          (the conditional dx_t/dt)
    epsilon   x_0 = (x_t - alpha x_1) / sigma
    x_1       x_1 = (x_t - sigma x_0) / alpha

Solving ``[x_t; v] = [[alpha, sigma], [d alpha, d sigma]] [x_1; x_0]`` with
``D = alpha d sigma - sigma d alpha`` (never 0 when ``alpha / sigma`` is
increasing) gives the six conversions:

    velocity -> x_1:      (d sigma x_t - sigma v) / D
    velocity -> epsilon:  (alpha v - d alpha x_t) / D
    x_1 -> velocity:      (d sigma x_t + (d alpha sigma - d sigma alpha) x_1) / sigma     (singular at sigma = 0, t = 1)
    epsilon -> velocity:  (d alpha x_t + (d sigma alpha - d alpha sigma) x_0) / alpha     (singular at alpha = 0, t = 0)
    x_1 -> epsilon:       (x_t - alpha x_1) / sigma
    epsilon -> x_1:       (x_t - sigma x_0) / alpha

Applied to the model's prediction of the conditional expectation these convert
the marginal fields exactly (they are affine in the prediction at fixed
``(x_t, t)``), which is what `sampling_model` wrappers and likelihoods use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from core import rng
from core.interfaces import Path, PathSample, Scheduler
from core.nn import append_dims

from .scheduler import CondOTScheduler
from registry import ConfigError

Prediction = Literal["velocity", "epsilon", "x1"]
PREDICTIONS: tuple[str, ...] = ("velocity", "epsilon", "x1")


class AffinePath(Path):
    """``x_t = alpha_t x_1 + sigma_t x_0`` with ``x_0 ~ N(0, I)``.

    The regression target of `sample` is the conditional velocity
    ``dx_t/dt = d_alpha_t x_1 + d_sigma_t x_0``; `target` gives the epsilon
    (``x_0``) and ``x_1`` targets. Shapes: ``x_0, x_1, x_t (B, ...)``, ``t (B,)``.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    # -- sampling ----------------------------------------------------------------
    def coefficients(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha, sigma, d alpha, d sigma)`` at ``t (B,)``, each shaped ``(B, 1, ..., 1)`` with `ndim` dims."""
        s = self.scheduler(t)
        return (append_dims(s.alpha_t, ndim), append_dims(s.sigma_t, ndim),
                append_dims(s.d_alpha_t, ndim), append_dims(s.d_sigma_t, ndim))

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        if type(self.scheduler) is CondOTScheduler and t.dtype == x_1.dtype == x_0.dtype:
            # alpha = t, sigma = 1 - t, d alpha = 1, d sigma = -1: the same numbers bit for bit (multiplying
            # by +-1 is exact) without the scheduler's four tensors (seven fewer ops per training step)
            a = append_dims(t, x_1.ndim)
            return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=a * x_1 + (1 - a) * x_0, target=x_1 - x_0)
        a, b, da, db = self.coefficients(t, x_1.ndim)
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=a * x_1 + b * x_0, target=da * x_1 + db * x_0)

    def target(self, ps: PathSample, prediction: Prediction = "velocity") -> Tensor:
        """What a model of the given prediction type regresses on for the draw `ps`."""
        if prediction == "velocity":
            return ps.target
        if prediction == "epsilon":
            return ps.x_0
        if prediction == "x1":
            return ps.x_1
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")

    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, *, dtype: torch.dtype | None = None,
                      draw: rng.ExampleRandom | None = None) -> Tensor:
        """``x_0 ~ N(0, I)`` ``(B, ...)`` (`core.rng.standard_normal`, stream ``"noise"``)."""
        return rng.standard_normal(shape, generator, device, dtype=dtype, draw=draw)

    # -- conversions between predictions (all ``(pred, x_t, t) -> Tensor`` of x_t's shape) -------
    def velocity_to_x1(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, b, da, db = self.coefficients(t, x_t.ndim)
        return (db * x_t - b * velocity) / (a * db - b * da)

    def velocity_to_epsilon(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, b, da, db = self.coefficients(t, x_t.ndim)
        return (a * velocity - da * x_t) / (a * db - b * da)

    def x1_to_velocity(self, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, b, da, db = self.coefficients(t, x_t.ndim)
        return (db * x_t + (da * b - db * a) * x_1) / b

    def epsilon_to_velocity(self, epsilon: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, b, da, db = self.coefficients(t, x_t.ndim)
        return (da * x_t + (db * a - da * b) * epsilon) / a

    def x1_to_epsilon(self, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, b, _, _ = self.coefficients(t, x_t.ndim)
        return (x_t - a * x_1) / b

    def epsilon_to_x1(self, epsilon: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, b, _, _ = self.coefficients(t, x_t.ndim)
        return (x_t - b * epsilon) / a

    def convert(self, prediction: Tensor, x_t: Tensor, t: Tensor, source: Prediction, target: Prediction) -> Tensor:
        """Convert a `source`-type prediction at ``(x_t, t)`` into a `target`-type one."""
        for name in (source, target):
            if name not in PREDICTIONS:
                raise ValueError(f"unknown prediction {name!r}; expected one of {PREDICTIONS}")
        if source == target:
            return prediction
        return getattr(self, f"{source}_to_{target}")(prediction, x_t, t)

    # -- scores --------------------------------------------------------------------
    def epsilon_to_score(self, epsilon: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t(x_t) = -epsilon / sigma_t`` (Tweedie)."""
        _, b, _, _ = self.coefficients(t, x_t.ndim)
        return -epsilon / b

    def velocity_to_score(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The score of the marginal ``p_t`` from the marginal velocity."""
        return self.epsilon_to_score(self.velocity_to_epsilon(velocity, x_t, t), x_t, t)

    def __repr__(self) -> str:
        return f"AffinePath({self.scheduler!r})"


def make_affine(scheduler: Scheduler | None = None) -> AffinePath:
    """Path factory: needs the experiment's ``[scheduler]``."""
    if scheduler is None:
        raise ConfigError("the affine path needs a [scheduler] section (e.g. plugin = \"cond_ot\")")
    return AffinePath(scheduler)
