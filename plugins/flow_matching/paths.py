"""The affine probability path ``x_t = alpha_t x_1 + sigma_t x_0`` over any scheduler."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from core.interfaces import Path, PathSample, Scheduler
from core.nn import append_dims
from registry import ConfigError


class AffinePath(Path):
    """``x_t = alpha_t x_1 + sigma_t x_0`` with ``x_0 ~ N(0, I)``.

    The regression target is the conditional velocity
    ``dx_t/dt = d_alpha_t x_1 + d_sigma_t x_0``.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        s = self.scheduler(t)
        a, b = append_dims(s.alpha_t, x_1.ndim), append_dims(s.sigma_t, x_1.ndim)
        da, db = append_dims(s.d_alpha_t, x_1.ndim), append_dims(s.d_sigma_t, x_1.ndim)
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=a * x_1 + b * x_0, target=da * x_1 + db * x_0)

    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device or "cpu")


def build_affine(scheduler: Scheduler | None = None) -> AffinePath:
    """Path factory: needs the experiment's ``[scheduler]``."""
    if scheduler is None:
        raise ConfigError("the affine path needs a [scheduler] section (e.g. plugin = \"cond_ot\")")
    return AffinePath(scheduler)
