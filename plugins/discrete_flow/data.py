"""``with_mask_token``: any discrete data source, with a mask token added to its vocabulary.

The mask source of the mixture path needs a token id that the data never
uses and that backbones embed and predict. Backbones size themselves from
``spec.vocab_size`` alone, so this wrapper declares the vocabulary ``V + 1``
with ``spec.extra["mask_token"] = V`` and otherwise passes everything through
(batches, held-out data, pictures, and any other attribute of the wrapped source)::

    [data]
    plugin = "with_mask_token"
    data = { plugin = "digits", form = "discrete" }
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch

import registry
from core.interfaces import Batch, DataSource
from registry import ConfigError


@attrs.define
class WithMaskTokenConfig:
    """Options of the with_mask_token data source.

    Attributes:
        data: the wrapped discrete data source, a table with its own plugin key.
    """

    data: dict[str, Any]

    def __attrs_post_init__(self) -> None:
        try:
            self.data = registry.resolved("data", self.data)
        except ConfigError as exc:
            raise exc.within("data") from None


class WithMaskToken(DataSource):
    """See the module docstring."""

    def __init__(self, config: WithMaskTokenConfig):
        try:
            self.inner = registry.build("data", config.data)
        except ConfigError as exc:
            raise exc.within("data") from None
        spec = self.inner.spec
        if spec.kind != "discrete":
            raise ConfigError(f"with_mask_token wraps discrete data; {config.data['plugin']!r} gives {spec.kind!r}",
                              ("data",))
        if "mask_token" in spec.extra:
            raise ConfigError(f"{config.data['plugin']!r} already has a mask token ({spec.extra['mask_token']})",
                              ("data",))
        self.spec = attrs.evolve(spec, vocab_size=spec.vocab_size + 1,
                                 extra={**spec.extra, "mask_token": spec.vocab_size})

    @property
    def num_examples(self) -> int | None:  # a class attribute of DataSource, so __getattr__ would not forward it
        return self.inner.num_examples

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        return self.inner.train_batches(batch_size, seed=seed, start_step=start_step, rank=rank, world_size=world_size)

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return self.inner.reference(n, generator)

    def render(self, batch: Batch, path: str) -> list[str]:
        return self.inner.render(batch, path)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (during construction or unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)


def make_with_mask_token(config: WithMaskTokenConfig) -> WithMaskToken:
    """Data factory for ``plugin = "with_mask_token"``."""
    return WithMaskToken(config)
