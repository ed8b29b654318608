"""scikit-learn's 8x8 handwritten digits: 1797 grey images with 17 intensity levels (0..16).

Continuous form: ``x (B, 1, 8, 8)`` scaled to [-1, 1] as ``x = v / 8 - 1``.
Discrete form: ``x (B, 1, 8, 8)`` LongTensor of the levels 0..16 (vocabulary 17).
Labels ``y (B,)`` in 0..9. A seeded, stratified 80/20 train/held-out split.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from core.data import TensorDataSource, generator as make_generator
from core.interfaces import Batch, DataSpec

from .render import grid_png

LEVELS = 17


@attrs.define
class DigitsConfig:
    """Options of the digits data source.

    Attributes:
        form: "continuous" (floats in [-1, 1]) or "discrete" (token ids 0..16).
        held_out: fraction of images held out for evaluation (stratified by class).
        conditional: provide class labels ``y`` (10 classes).
        split_seed: seed of the train / held-out split.
    """

    form: Literal["continuous", "discrete"] = "continuous"
    held_out: float = 0.2
    conditional: bool = True
    split_seed: int = 0


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, 8, 8) int64 levels 0..16, labels (1797,) int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.int64).reshape(-1, 1, 8, 8)
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


class Digits(TensorDataSource):
    """The digits data set as a flowforge data source."""

    def __init__(self, config: DigitsConfig):
        if not 0.0 < config.held_out < 1.0:
            from registry import ConfigError

            raise ConfigError(f"expected a fraction in (0, 1), got {config.held_out}", ("held_out",))
        self.config = config
        levels, labels = load_digits_tensors()
        g = make_generator(config.split_seed, "digits-split")
        held = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(10):
            idx = (labels == c).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=g)]
            held[idx[: int(round(len(idx) * config.held_out))]] = True
        x = levels if config.form == "discrete" else levels.float() / 8.0 - 1.0
        train, test = {"x": x[~held]}, {"x": x[held]}
        if config.conditional:
            train["y"], test["y"] = labels[~held], labels[held]
        spec = DataSpec(shape=(1, 8, 8), kind=config.form, num_classes=10 if config.conditional else 0,
                        vocab_size=LEVELS if config.form == "discrete" else 0)
        super().__init__(train, test, spec)

    def render(self, batch: Batch, path: str) -> list[str]:
        x = batch["x"]
        if self.config.form == "discrete":
            x = x.float() / 8.0 - 1.0
        if "y" in batch:
            order = torch.argsort(batch["y"], stable=True)
            x = x[order]
        return [grid_png(x.clamp(-1, 1), path, (-1.0, 1.0), upscale=4)]


def make_digits(config: DigitsConfig) -> Digits:
    """Data factory for ``plugin = "digits"``."""
    return Digits(config)
