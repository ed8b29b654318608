"""Sample-based distances between two distributions, as torchmetrics Metrics.

Both accumulate reference (``update(x, real=True)``) and generated
(``update(x, real=False)``) examples of shape ``(N, ...)`` (flattened to
``(N, D)``); under several processes torchmetrics concatenates every rank's
examples before computing.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor
from torchmetrics import Metric

from core.validate import positive


class _TwoSampleMetric(Metric):
    higher_is_better = False
    result_names: tuple[str, ...] = ()  # one number
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, samples: Tensor, real: bool) -> None:
        x = samples.detach().reshape(samples.shape[0], -1).double()
        (self.real if real else self.fake).append(x)

    def _pair(self) -> tuple[Tensor, Tensor]:
        def cat(v):
            return torch.cat(v) if isinstance(v, list) else v

        a, b = cat(self.real), cat(self.fake)
        if len(a) == 0 or len(b) == 0:
            raise ValueError(f"{type(self).__name__} needs both real and generated samples")
        return a, b


def mean_pairwise_distance(a: Tensor, b: Tensor, chunk: int = 2048) -> Tensor:
    """``mean_{i,j} ||a_i - b_j||_2`` for ``a (N, D)``, ``b (M, D)``, computed in chunks."""
    total = torch.zeros((), dtype=a.dtype)
    for i in range(0, len(a), chunk):
        total += torch.cdist(a[i:i + chunk], b).sum()
    return total / (len(a) * len(b))


class EnergyDistance(_TwoSampleMetric):
    """Energy distance, V-statistic form (never negative):

        D(P, Q) = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||

    with every expectation the mean over all pairs of the two samples.
    """

    def compute(self) -> Tensor:
        a, b = self._pair()
        return 2 * mean_pairwise_distance(a, b) - mean_pairwise_distance(a, a) - mean_pairwise_distance(b, b)


@attrs.define
class SlicedWassersteinConfig:
    """Options of sliced_wasserstein.

    Attributes:
        projections: number of random unit directions.
        seed: seed of the directions (fixed, so values are comparable across runs).
    """

    projections: int = 256
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        positive(self, "projections")


class SlicedWasserstein(_TwoSampleMetric):
    """Sliced 1-Wasserstein distance: the mean over random unit directions ``theta`` of
    ``W_1(theta . X, theta . Y)``, each 1D distance computed from sorted projections
    (the two samples are cut to the same size)."""

    def __init__(self, config: SlicedWassersteinConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config or SlicedWassersteinConfig()

    def compute(self) -> Tensor:
        a, b = self._pair()
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        g = torch.Generator().manual_seed(self.config.seed)
        theta = torch.randn(a.shape[1], self.config.projections, generator=g, dtype=a.dtype)
        theta = theta / theta.norm(dim=0, keepdim=True)
        pa, _ = torch.sort(a @ theta, dim=0)
        pb, _ = torch.sort(b @ theta, dim=0)
        return (pa - pb).abs().mean()


def make_energy_distance() -> EnergyDistance:
    """Metric factory for ``plugin = "energy_distance"``."""
    return EnergyDistance()


def make_sliced_wasserstein(config: SlicedWassersteinConfig) -> SlicedWasserstein:
    """Metric factory for ``plugin = "sliced_wasserstein"``."""
    return SlicedWasserstein(config)
