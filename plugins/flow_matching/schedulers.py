"""Schedulers: ``t -> (alpha_t, sigma_t, d alpha_t/dt, d sigma_t/dt)`` with t=0 noise, t=1 data."""

from __future__ import annotations

import torch
from torch import Tensor

from core.interfaces import ConvexScheduler, SchedulerOutput


class CondOTScheduler(ConvexScheduler):
    """Conditional optimal transport (rectified flow): ``alpha_t = t``, ``sigma_t = 1 - t``.

    ``d alpha/dt = 1``, ``d sigma/dt = -1``; ``snr = t / (1 - t)`` so
    ``snr_inverse(r) = r / (1 + r)``; ``kappa_t = t`` so ``kappa_inverse(k) = k``.
    """

    def __call__(self, t: Tensor) -> SchedulerOutput:
        return SchedulerOutput(alpha_t=t, sigma_t=1 - t, d_alpha_t=torch.ones_like(t), d_sigma_t=-torch.ones_like(t))

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return snr / (1.0 + snr)

    def kappa_inverse(self, kappa: Tensor) -> Tensor:
        return kappa
