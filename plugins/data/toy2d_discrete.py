"""Toy 2D distributions quantised to a vocabulary of bins per coordinate.

Each coordinate of a `toy2d` point in ``[low, high)`` becomes the index of its
bin, ``k = floor((x - low) / (high - low) * bins)`` clamped to ``[0, bins)``;
examples are ``{"x": (B, 2)}`` LongTensors. Bin ``k`` stands for its centre
``low + (k + 1/2) (high - low) / bins`` (``dequantize``), which pictures and the
``dequantized`` metric use. With ``mask_token = true`` the vocabulary gains a
mask token, id ``bins`` (``spec.extra["mask_token"]``), that the data never
uses. Sampling is as in `toy2d`: the global batch of each step drawn fresh from
``(seed, step)`` and sliced by rank (the same examples on any number of processes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import attrs
import torch
from torch import Tensor

from core.data import generator as make_generator
from core.interfaces import Batch, DataSource, DataSpec
from registry import ConfigError

from .render import scatter_png
from .toy2d import sample_toy2d


@attrs.define
class Toy2DDiscreteConfig:
    """Options of the toy2d_discrete data source.

    Attributes:
        dataset: checkerboard, moons, eight_gaussians or two_spirals (as in toy2d).
        noise: standard deviation of the Gaussian noise of moons, gaussians and spirals.
        bins: number of bins (tokens) per coordinate.
        low: lower edge of the binned range (both coordinates).
        high: upper edge of the binned range (both coordinates).
        mask_token: add a mask token (id = bins) to the vocabulary, for the mixture path's mask source.
    """

    dataset: Literal["checkerboard", "moons", "eight_gaussians", "two_spirals"] = "checkerboard"
    noise: float = 0.1
    bins: int = 128
    low: float = -4.0
    high: float = 4.0
    mask_token: bool = False

    def __attrs_post_init__(self) -> None:
        if self.bins < 2:
            raise ConfigError(f"expected an integer of at least 2, got {self.bins!r}", ("bins",))
        if not self.high > self.low:
            raise ConfigError(f"expected high > low, got low = {self.low}, high = {self.high}", ("high",))


class Toy2DDiscrete(DataSource):
    """See the module docstring."""

    def __init__(self, config: Toy2DDiscreteConfig):
        self.config = config
        extra = {"bin_low": config.low, "bin_high": config.high}
        if config.mask_token:
            extra["mask_token"] = config.bins
        self.spec = DataSpec(shape=(2,), kind="discrete", vocab_size=config.bins + config.mask_token, extra=extra)

    def quantize(self, x: Tensor) -> Tensor:
        """Points ``(N, 2)`` -> bin indices ``(N, 2)`` (LongTensor)."""
        c = self.config
        k = torch.floor((x - c.low) / (c.high - c.low) * c.bins)
        return k.clamp(0, c.bins - 1).long()

    def dequantize(self, tokens: Tensor) -> Tensor:
        """Bin indices ``(N, 2)`` -> bin centres ``(N, 2)`` (float32)."""
        c = self.config
        return c.low + (tokens.float() + 0.5) * (c.high - c.low) / c.bins

    def _draw(self, n: int, generator: torch.Generator) -> Tensor:
        return self.quantize(sample_toy2d(self.config.dataset, n, generator, self.config.noise))

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        step = start_step
        while True:  # the global batch of the step, sliced: the same examples on any number of processes
            full = self._draw(batch_size * world_size, make_generator(seed, "toy2d-discrete-train", step))
            yield {"x": full[rank * batch_size:(rank + 1) * batch_size]}
            step += 1

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return {"x": self._draw(n, generator)}

    def render(self, batch: Batch, path: str) -> list[str]:
        c = self.config
        title = f"{c.dataset}, {c.bins} bins per coordinate ({len(batch['x'])} samples)"
        lim = max(abs(c.low), abs(c.high)) + 0.5
        return [scatter_png(self.dequantize(batch["x"].clamp(0, c.bins - 1)), path, title=title, lim=lim)]


def make_toy2d_discrete(config: Toy2DDiscreteConfig) -> Toy2DDiscrete:
    """Data factory for ``plugin = "toy2d_discrete"``."""
    return Toy2DDiscrete(config)
