"""Data sources of the latent family: ``resized`` images and ``latent`` (a source's images, encoded).

``resized`` wraps any image source and resizes its examples ``(C, H, W)`` to ``(C, size, size)``
(bilinear, antialiased when shrinking), e.g. the 8x8 digits as 32x32 images.

``latent`` wraps an image source (optionally resized) and the experiment's ``[autoencoder]``:

* training batches ``x (B, c, h, w)`` are the scaled latents of the training split, encoded once
  (in memory, or into the sharded ``cache`` folder that ``flowforge encode`` also writes, read
  memory-mapped). With a sampling posterior each step draws ``z = m + s eps`` with ``eps`` from
  the run's per-example streams (`core.rng`, stream ``"latent"``); with ``flip`` each example is
  its image or its mirror image (stream ``"flip"``), both encoded in the cache (DiT's flip pair).
  Either is a pure function of (seed, step, global example index): the same on any number of
  processes.
* held-out examples (`reference`) are the wrapped source's held-out images, encoded with the
  posterior mean; each batch also carries the images themselves (``"observation"``), which metrics
  with ``space = "observations"`` compare with the decoded samples (`core.interfaces.SampleMetric`).
* `render` decodes the latents and draws the images as the wrapped source does; `decode` gives the
  images to the ``decoded`` metrics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import registry
from core import rng, validate
from core.data import step_indices
from core.interfaces import Batch, DataSource, DataSpec
from registry import ConfigError

from . import cache
from .interface import Autoencoder


def _inner(mapping: dict[str, Any], key: str = "data") -> DataSource:
    """The wrapped data source, built through the registry (errors located under `key`)."""
    _check_inner(mapping, key)
    try:
        return registry.build("data", mapping)
    except ConfigError as exc:
        raise exc.within(key) from None


def _check_inner(mapping: Any, key: str = "data") -> None:
    """Validate the wrapped source's table when the experiment is resolved (before the VAE is loaded)."""
    if not isinstance(mapping, dict) or "plugin" not in mapping:
        raise ConfigError("expected a table naming the wrapped data source, e.g. {plugin = \"digits\"}", (key,))
    try:
        registry.resolved("data", mapping)
    except ConfigError as exc:
        raise exc.within(key) from None


def _image_spec(spec: DataSpec, key: str = "data") -> None:
    if spec.kind != "continuous" or len(spec.shape) != 3:
        raise ConfigError(f"needs continuous images (C, H, W); the wrapped source gives {spec.kind} {spec.shape}", (key,))


@attrs.define
class ResizedConfig:
    """Options of the resized data source.

    Attributes:
        data: the wrapped image source, a table with its ``plugin`` and options.
        size: the side of the resized square images.
    """

    data: dict[str, Any]
    size: int = 32

    def __attrs_post_init__(self) -> None:
        validate.positive(self, "size")
        _check_inner(self.data)


class Resized(DataSource):
    """Another source's images resized to ``(C, size, size)`` (see the module docstring)."""

    def __init__(self, config: ResizedConfig):
        self.inner = _inner(config.data)
        _image_spec(self.inner.spec)
        self.size = config.size
        s = self.inner.spec
        self.spec = DataSpec((s.shape[0], config.size, config.size), s.kind, s.num_classes, s.vocab_size, s.extra)
        self.num_examples = self.inner.num_examples

    def _resize(self, batch: Batch) -> dict[str, Tensor]:
        x = batch["x"].float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=self.size < x.shape[-1])
        return {**batch, "x": x}

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        for batch in self.inner.train_batches(batch_size, seed=seed, start_step=start_step, rank=rank,
                                              world_size=world_size):
            yield self._resize(batch)

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return self._resize(self.inner.reference(n, generator))

    def reference_slice(self, n: int, seed: int, start: int, stop: int) -> Batch:
        return self._resize(self.inner.reference_slice(n, seed, start, stop))

    def render(self, batch: Batch, path: str) -> list[str]:
        return self.inner.render(batch, path)


@attrs.define
class LatentConfig:
    """Options of the latent data source.

    Attributes:
        data: the wrapped image source (images in [-1, 1]), a table with its ``plugin`` and options.
        size: resize its images to ``size x size`` first (0: keep them).
        cache: folder of the sharded latent cache (empty: encode into memory at start-up). Missing
            shards are encoded at start-up; ``flowforge encode`` writes them ahead, on many processes.
        shard_size: examples per cache shard.
        flip: also encode each mirrored image; training batches take one of the pair at random.
    """

    data: dict[str, Any]
    size: int = 0
    cache: str = ""
    shard_size: int = 1024
    flip: bool = False

    def __attrs_post_init__(self) -> None:
        validate.non_negative(self, "size")
        validate.positive(self, "shard_size")
        _check_inner(self.data)


def observation_source(config: LatentConfig) -> DataSource:
    """The image source `config` wraps (resized when ``size`` is set)."""
    source = Resized(ResizedConfig(config.data, config.size)) if config.size else _inner(config.data)
    _image_spec(source.spec)
    return source


def cache_meta(config: LatentConfig, source: DataSource, autoencoder: Autoencoder) -> dict[str, Any]:
    """The cache's meta.json for `config` (its key hashes the resolved data table, the size and the VAE)."""
    key = repr((registry.resolved("data", config.data), config.size, autoencoder.fingerprint()))
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return cache.meta_of(source, autoencoder, config.shard_size, config.flip, digest)


class LatentData(DataSource):
    """See the module docstring."""

    def __init__(self, config: LatentConfig, autoencoder: Autoencoder | None):
        if autoencoder is None:
            raise ConfigError("the latent data source needs an [autoencoder] section (e.g. plugin = \"sd_vae\")")
        self.config, self.autoencoder = config, autoencoder
        self.observation = observation_source(config)
        meta = cache_meta(config, self.observation, autoencoder)
        self.meta = meta
        if config.cache:
            folder = Path(config.cache)
            cache.encode(folder, self.observation, autoencoder, meta)
            shards = cache.read(folder, meta)
        else:
            shards = [cache.encode_shard(self.observation, autoencoder, meta, k) for k in range(meta["num_shards"])]
        self.rows = cache.Rows(shards)
        obs = self.observation.spec
        self.spec = DataSpec(tuple(meta["latent_shape"]), "continuous", obs.num_classes,
                             extra={"observation_shape": obs.shape})
        self.num_examples = len(self.rows)

    def _latents(self, positions: np.ndarray, seeds: Tensor | None, flip: Tensor | None) -> Tensor:
        def take(key: str) -> Tensor:
            out = torch.from_numpy(self.rows.rows(key, positions))
            if flip is not None and flip.any():
                out[flip] = torch.from_numpy(self.rows.rows(key + "_flip", positions[flip.numpy()]))
            return out

        z = take("mean")
        if seeds is not None:
            z = z + take("std") * rng.normal(seeds, z.shape[1:], "latent")
        return z

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        step = start_step
        while True:
            positions = step_indices(len(self.rows), batch_size * world_size, step, seed, rank, world_size).numpy()
            seeds = rng.shard_seeds(seed, step, batch_size, rank)
            flip = rng.uniform(seeds, (), "flip") < 0.5 if self.meta["flip"] else None
            batch = {"x": self._latents(positions, seeds if self.meta["moments"] else None, flip)}
            if self.meta["labelled"]:
                batch["y"] = torch.from_numpy(self.rows.rows("y", positions))
            yield batch
            step += 1

    def _encoded(self, batch: Batch) -> dict[str, Tensor]:
        """Held-out images -> ``{"x": their latents (posterior mean), "observation": the images, ...}``."""
        images = batch["x"].float()
        return {**batch, "x": self.autoencoder.encode(images), "observation": images}

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return self._encoded(self.observation.reference(n, generator))

    def reference_slice(self, n: int, seed: int, start: int, stop: int) -> Batch:
        return self._encoded(self.observation.reference_slice(n, seed, start, stop))

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``(B, c, h, w)`` -> images ``(B, C, H, W)`` in [-1, 1] (the wrapped source's space)."""
        return self.autoencoder.decode(z).clamp(-1, 1)

    @property
    def observation_spec(self) -> DataSpec:
        """The wrapped image source's spec (what `decode` returns)."""
        return self.observation.spec

    def render(self, batch: Batch, path: str) -> list[str]:
        return self.observation.render({**batch, "x": self.decode(batch["x"])}, path)


def make_resized(config: ResizedConfig) -> Resized:
    """Data factory (``resized``)."""
    return Resized(config)


def make_latent(config: LatentConfig, autoencoder: Autoencoder | None = None) -> LatentData:
    """Data factory (``latent``): built after ``[autoencoder]``, which its signature names."""
    return LatentData(config, autoencoder)
