"""Toy 2D distributions, sampled fresh from seeded generators (an endless data set).

The global batch of step ``s`` is drawn with a generator seeded from
``(seed, s)`` and rank ``r`` of ``W`` takes its ``r``-th contiguous slice, so
the union over ranks is the batch one process would see whatever ``W`` is.
Held-out samples use the caller's generator, independent of training draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import attrs
import torch
from torch import Tensor

from core.data import generator as make_generator
from core.interfaces import Batch, DataSource, DataSpec
from core.validate import non_negative

from .render import scatter_png


@attrs.define
class Toy2DConfig:
    """Options of the toy2d data source.

    Attributes:
        dataset: which distribution: checkerboard, moons, eight_gaussians or two_spirals.
        noise: standard deviation of Gaussian noise added to moons, gaussians and spirals.
    """

    dataset: Literal["checkerboard", "moons", "eight_gaussians", "two_spirals"] = "checkerboard"
    noise: float = 0.1

    def __attrs_post_init__(self) -> None:
        non_negative(self, "noise")


def sample_toy2d(name: str, n: int, generator: torch.Generator, noise: float = 0.1) -> Tensor:
    """``n`` points ``(n, 2)`` of the named distribution, roughly within [-4, 4]^2."""
    g = generator
    if name == "checkerboard":
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2 + torch.floor(x1) % 2
        return torch.stack([x1, x2], dim=1) * 2
    if name == "moons":
        upper = torch.rand(n, generator=g) < 0.5
        theta = torch.rand(n, generator=g) * math.pi
        x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
        y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
        pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.5
        return pts + noise * torch.randn(n, 2, generator=g)
    if name == "eight_gaussians":
        k = torch.randint(0, 8, (n,), generator=g).float()
        centers = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1) * 3
        return centers + noise * 2 * torch.randn(n, 2, generator=g)
    if name == "two_spirals":
        r = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        pts = torch.stack([-torch.cos(r) * r, torch.sin(r) * r], dim=1) * sign[:, None] / 3
        return pts + noise * torch.randn(n, 2, generator=g)
    raise ValueError(f"unknown toy2d dataset {name!r}")


class Toy2D(DataSource):
    """An endless 2D data set; examples are ``{"x": (B, 2)}`` floats."""

    def __init__(self, config: Toy2DConfig):
        self.config = config
        self.spec = DataSpec(shape=(2,), kind="continuous")

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        step = start_step
        while True:
            g = make_generator(seed, "toy2d-train", step)
            full = sample_toy2d(self.config.dataset, batch_size * world_size, g, self.config.noise)
            yield {"x": full[rank * batch_size:(rank + 1) * batch_size]}
            step += 1

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return {"x": sample_toy2d(self.config.dataset, n, generator, self.config.noise)}

    def in_support(self, x: Tensor) -> Tensor | None:
        """``(N,)`` bools: whether each point of `x` ``(N, 2)`` lies where the density is positive.

        Only the checkerboard has a bounded support: the 8 cells ``[2i, 2i+2) x [2j, 2j+2)``,
        ``-2 <= i, j < 2``, with ``i - j`` even. The other data sets add Gaussian noise (support
        everywhere): None.
        """
        if self.config.dataset != "checkerboard":
            return None
        cell = torch.floor(x / 2)
        inside = ((x >= -4) & (x < 4)).all(dim=1)
        return inside & ((cell[:, 0] - cell[:, 1]) % 2 == 0)

    def render(self, batch: Batch, path: str) -> list[str]:
        return [scatter_png(batch["x"], path, title=f"{self.config.dataset} ({len(batch['x'])} samples)", lim=4.5)]


def make_toy2d(config: Toy2DConfig) -> Toy2D:
    """Data factory for ``plugin = "toy2d"``."""
    return Toy2D(config)
