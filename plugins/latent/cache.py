"""Latents of a data set's training split, written once in shards and read memory-mapped.

Layout of a cache folder::

    meta.json                  {"format", "fingerprint", "num_examples", "shard_size", "num_shards", ...}
    shard-00000.npz ...        np.savez (uncompressed, so memory-mapped): per example of the shard
        mean (n, c, h, w)      scaled posterior mean (float32)
        std  (n, c, h, w)      scaled posterior std, when the autoencoder samples its posterior
        mean_flip, std_flip    the same for the horizontally mirrored image (DiT's flip pair)
        y    (n,)              labels, when the data has them

Example ``i`` of shard ``k`` is position ``k * shard_size + i`` of one enumeration of the training
split: ``train_batches(shard_size, seed=ENUMERATION_SEED, start_step=k)`` of the source, whose first
epoch is a seeded permutation of every training example (`core.data.step_indices`). Shard ``k``
is therefore a pure function of ``k``: any number of processes can each write the shards
``k = rank, rank + P, ...`` and the cache is the same. A shard file is complete once it exists
(written to a temporary name and renamed), so a resumed encode skips finished shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.interfaces import DataSource
from core.npzfile import read_npz
from registry import ConfigError

from .interface import Autoencoder

FORMAT = 1
ENUMERATION_SEED = 0x1A7E47


def shard_file(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.npz"


def meta_of(source: DataSource, autoencoder: Autoencoder, shard_size: int, flip: bool, key: str) -> dict[str, Any]:
    """What a cache holds; two caches with the same meta hold the same arrays."""
    n = source.num_examples
    if n is None:
        raise ConfigError("the wrapped data source is endless (no num_examples): its latents cannot be cached",
                          ("data",))
    return {"format": FORMAT, "fingerprint": key, "num_examples": int(n), "shard_size": shard_size,
            "num_shards": -(-int(n) // shard_size), "flip": flip, "moments": autoencoder.sample_posterior,
            "latent_shape": list(autoencoder.latent_shape(source.spec.shape)), "labelled": source.spec.num_classes > 0}


def shard_batch(source: DataSource, meta: dict[str, Any], k: int) -> dict[str, Tensor]:
    """Shard ``k``'s examples of the enumeration (see the module docstring)."""
    size = meta["shard_size"]
    batch = next(iter(source.train_batches(size, seed=ENUMERATION_SEED, start_step=k)))
    keep = min(size, meta["num_examples"] - k * size)
    return {key: value[:keep] for key, value in batch.items()}


def encode_shard(source: DataSource, autoencoder: Autoencoder, meta: dict[str, Any], k: int) -> dict[str, np.ndarray]:
    """The arrays of shard ``k``."""
    batch = shard_batch(source, meta, k)
    out: dict[str, np.ndarray] = {}
    views = [("", batch["x"])] + ([("_flip", batch["x"].flip(-1))] if meta["flip"] else [])
    for suffix, x in views:
        mean, std = autoencoder.moments(x.float())
        out["mean" + suffix] = mean.cpu().numpy().astype(np.float32)
        if meta["moments"]:
            out["std" + suffix] = std.cpu().numpy().astype(np.float32)
    if meta["labelled"] and "y" in batch:
        out["y"] = batch["y"].cpu().numpy().astype(np.int64)
    return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def prepare(folder: Path, meta: dict[str, Any]) -> None:
    """Create `folder` with `meta` (the same meta from every process), or check the one there."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "meta.json"
    if file.exists():
        found = json.loads(file.read_text())
        if found != meta:
            diff = sorted(k for k in meta if found.get(k) != meta[k])
            raise ConfigError(f"the latent cache {str(folder)!r} was written for other data or another autoencoder "
                              f"(differs in {', '.join(diff)}); delete it or name another cache", ("cache",))
        return
    _write_atomic(file, lambda fh: fh.write(json.dumps(meta, indent=1, sort_keys=True).encode()))


def encode(folder: Path, source: DataSource, autoencoder: Autoencoder, meta: dict[str, Any], rank: int = 0,
           world_size: int = 1) -> tuple[int, int]:
    """Write this rank's missing shards (``k = rank, rank + world_size, ...``); returns (written, skipped)."""
    prepare(folder, meta)
    written = skipped = 0
    for k in range(rank, meta["num_shards"], world_size):
        path = shard_file(folder, k)
        if path.exists():
            skipped += 1
            continue
        arrays = encode_shard(source, autoencoder, meta, k)
        _write_atomic(path, lambda fh: np.savez(fh, **arrays))
        written += 1
    return written, skipped


def missing(folder: Path, meta: dict[str, Any]) -> list[int]:
    return [k for k in range(meta["num_shards"]) if not shard_file(folder, k).exists()]


def read(folder: Path, meta: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """Every shard's arrays, memory-mapped."""
    keys = ["mean"] + (["std"] if meta["moments"] else [])
    keys += [k + "_flip" for k in keys] if meta["flip"] else []
    keys += ["y"] if meta["labelled"] else []
    layout = "a flowforge latent-cache shard (flowforge encode)"
    return [read_npz(shard_file(folder, k), keys, set(), True, ("cache",), layout) for k in range(meta["num_shards"])]


class Rows:
    """Rows of arrays split over shards, gathered by global position: ``rows(key, positions) -> (len, ...)``."""

    def __init__(self, shards: list[dict[str, np.ndarray]]):
        self.shards = shards
        sizes = [len(s["mean"]) for s in shards]
        self.starts = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, key: str, positions: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        first = self.shards[0][key]
        out = np.empty((len(positions), *first.shape[1:]), dtype=first.dtype)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self.shards[k][key][positions[sel] - self.starts[k]]
        return out
