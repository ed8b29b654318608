r"""A mixture of von Mises-Fisher distributions on the sphere S^2 (unit vectors in R^3), endless and seeded.

The vMF density with mean direction ``mu`` and concentration ``kappa`` is
``p(x) = kappa / (4 pi sinh kappa) exp(kappa <mu, x>)``. On S^2 the cosine ``w = <mu, x>`` has density
``kappa e^{kappa w} / (2 sinh kappa)`` on [-1, 1] and the direction around ``mu`` is uniform, so (inverting
the CDF ``F(w) = (e^{kappa w} - e^{-kappa}) / (e^kappa - e^{-kappa})``) a draw is

    w = 1 + log(u + (1 - u) e^{-2 kappa}) / kappa,   u ~ U(0, 1),
    x = H (sqrt(1 - w^2) cos phi, sqrt(1 - w^2) sin phi, w),   phi ~ U(0, 2 pi),

with ``H`` the Householder reflection taking the pole ``e_z`` to ``mu`` (Wood's algorithm for S^2, where
its rejection step is not needed). The mixture picks component ``k`` with probability ``weights[k]``.
Means are given as (longitude, latitude) in degrees; pictures are longitude/latitude scatter plots.
As in toy2d, the global batch of step ``s`` comes from a generator seeded by ``(seed, s)``; rank ``r``
takes its slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import attrs
import torch
from torch import Tensor

from core.data import generator as make_generator
from core.interfaces import Batch, DataSource, DataSpec
from core.validate import positive, require

from .render import lonlat_png


def _default_means() -> list[tuple[float, float]]:
    return [(-120.0, 45.0), (0.0, 0.0), (120.0, -30.0), (-45.0, -50.0), (60.0, 60.0)]


@attrs.define
class VMFMixtureConfig:
    """Options of the vmf_mixture data source.

    Attributes:
        means: the components' mean directions as [longitude, latitude] in degrees.
        kappa: the concentration of every component (larger: tighter; the spread is about 1 / sqrt(kappa) rad).
        weights: the mixture weights (None: equal); normalised to sum to 1.
    """

    means: list[tuple[float, float]] = attrs.field(factory=_default_means)
    kappa: float = 30.0
    weights: list[float] | None = None

    def __attrs_post_init__(self) -> None:
        positive(self, "kappa")
        require(len(self.means) > 0, "means", "at least one [longitude, latitude] pair", self.means)
        require(all(-90.0 <= lat <= 90.0 for _, lat in self.means), "means", "latitudes in [-90, 90]", self.means)
        if self.weights is not None:
            require(len(self.weights) == len(self.means) and all(w >= 0 for w in self.weights)
                    and sum(self.weights) > 0, "weights", f"{len(self.means)} non-negative numbers, not all 0",
                    self.weights)


def lonlat_to_xyz(lon_deg: Tensor, lat_deg: Tensor) -> Tensor:
    """Unit vectors ``(..., 3)`` of longitudes / latitudes in degrees ``(...)``."""
    lon, lat = torch.deg2rad(lon_deg), torch.deg2rad(lat_deg)
    return torch.stack([torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon), torch.sin(lat)], -1)


def xyz_to_lonlat(x: Tensor) -> Tensor:
    """``(N, 2)`` (longitude in (-180, 180], latitude in [-90, 90]) in degrees of points ``(N, 3)`` (normalised)."""
    x = x / x.norm(dim=-1, keepdim=True)
    return torch.rad2deg(torch.stack([torch.atan2(x[:, 1], x[:, 0]), torch.asin(x[:, 2].clamp(-1, 1))], -1))


def sample_vmf(mu: Tensor, kappa: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws ``(n, 3)`` float64 of vMF(mu, kappa) on S^2, ``mu (3,)`` or one mean per draw ``(n, 3)``."""
    mu = torch.as_tensor(mu, dtype=torch.float64).expand(n, 3)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    phi = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    w = 1.0 + torch.log(u + (1.0 - u) * math.exp(-2.0 * kappa)) / kappa
    r = torch.sqrt((1.0 - w * w).clamp_min(0.0))
    local = torch.stack([r * torch.cos(phi), r * torch.sin(phi), w], -1)
    v = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) - mu  # H = I - 2 v v^T / |v|^2 maps e_z to mu
    vv = (v * v).sum(-1, keepdim=True)
    reflect = local - 2.0 * v * (v * local).sum(-1, keepdim=True) / vv.clamp_min(1e-300)
    return torch.where(vv > 1e-24, reflect, local)


class VMFMixture(DataSource):
    """An endless vMF mixture on S^2; examples are ``{"x": (B, 3)}`` float32 unit vectors."""

    def __init__(self, config: VMFMixtureConfig):
        self.config = config
        self.spec = DataSpec(shape=(3,), kind="continuous", extra={"manifold": "sphere"})
        means = torch.tensor(config.means, dtype=torch.float64)
        self.means = lonlat_to_xyz(means[:, 0], means[:, 1])  # (K, 3)
        w = torch.tensor(config.weights or [1.0] * len(config.means), dtype=torch.float64)
        self.weights = w / w.sum()

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points ``(n, 3)`` float32 of the mixture."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return sample_vmf(self.means[k], self.config.kappa, n, generator).float()

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        step = start_step
        while True:
            full = self.sample(batch_size * world_size, make_generator(seed, "vmf-train", step))
            yield {"x": full[rank * batch_size:(rank + 1) * batch_size]}
            step += 1

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return {"x": self.sample(n, generator)}

    def render(self, batch: Batch, path: str) -> list[str]:
        return [lonlat_png(xyz_to_lonlat(batch["x"].double()), path,
                           title=f"vMF mixture on S^2, kappa={self.config.kappa:g} ({len(batch['x'])} samples)")]


def make_vmf_mixture(config: VMFMixtureConfig) -> VMFMixture:
    """Data factory for ``plugin = "vmf_mixture"``."""
    return VMFMixture(config)
