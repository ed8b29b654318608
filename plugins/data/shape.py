"""``shape_only``: a data spec without examples, for a model imported from a published checkpoint.

A run written by ``flowforge import`` (a DiT or ADM checkpoint trained elsewhere) has no training data
here, but its backbone, path and solver need the data's spec: the example shape ``(C, H, W)``, the class
count and the value range. This source declares them; ``flowforge sample`` renders generated batches as
a PNG grid. Asking it for training batches or reference examples (training, sample metrics) is a
`registry.ConfigError` that says to replace ``[data]`` with a real source of the same shape.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import torch

from core.interfaces import Batch, DataSource, DataSpec
from registry import ConfigError

from .npz import render_images


@attrs.define
class ShapeConfig:
    """Options of the shape data source.

    Attributes:
        shape: shape of one example, e.g. ``[4, 32, 32]`` (DiT-XL/2-256's SD-VAE latents) or ``[3, 64, 64]``.
        num_classes: class labels of the model (0: unconditional).
        value_range: ``[low, high]`` of the examples for pictures (empty: each batch's own range, as for latents).
        note: free text kept in the config (e.g. how to decode latents to images).
    """

    shape: list[int]
    num_classes: int = 0
    value_range: list[float] = attrs.Factory(list)
    note: str = ""

    def __attrs_post_init__(self) -> None:
        if not self.shape or any(s < 1 for s in self.shape):
            raise ConfigError(f"expected a non-empty list of positive sizes, got {self.shape}", ("shape",))
        if self.num_classes < 0:
            raise ConfigError(f"expected a non-negative integer, got {self.num_classes}", ("num_classes",))
        if self.value_range and (len(self.value_range) != 2 or self.value_range[0] >= self.value_range[1]):
            raise ConfigError(f"expected [low, high] with low < high, got {self.value_range}", ("value_range",))


class ShapeOnly(DataSource):
    """See the module docstring: ``spec`` only; `train_batches` and `reference` raise ConfigError."""

    num_examples = None

    def __init__(self, config: ShapeConfig):
        self.config = config
        self.spec = DataSpec(shape=tuple(config.shape), num_classes=config.num_classes)

    def _none(self, what: str) -> ConfigError:
        return ConfigError(f"[data] plugin = \"shape_only\" holds no examples ({what}): it only describes an imported "
                           f"model's data; set [data] to a source of shape {list(self.spec.shape)} to train or to "
                           f"compute sample metrics")

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        raise self._none("training batches were asked for")

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        raise self._none("reference examples were asked for")

    def render(self, batch: Batch, path: str) -> list[str]:
        value_range = tuple(self.config.value_range) if self.config.value_range else None
        return render_images(batch["x"], batch.get("y"), path, value_range)


def make_shape_only(config: ShapeConfig) -> ShapeOnly:
    """Data factory: a `ShapeOnly` source."""
    return ShapeOnly(config)
