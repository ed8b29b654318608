"""Helpers for data plugins: seed derivation, step-indexed batch streams, in-memory sources.

Training batches are a pure function of ``(seed, step, rank, world_size)``:
the global index stream is an endless concatenation of seeded permutations of
the data set, optimizer step ``s`` takes positions ``[s*G, (s+1)*G)`` of it
(``G`` = global batch), and rank ``r`` takes the ``r``-th contiguous slice.
A resumed run therefore sees exactly the batches of an uninterrupted one, and
the union over ranks is the batch a single process would see.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .interfaces import Batch, DataSource, DataSpec


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends on every part (ints, strings), stable across runs and platforms."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with ``derive_seed(*parts)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The seeded permutation of ``range(n)`` for `epoch` (cached: computed once per epoch, not per step)."""
    return torch.randperm(n, generator=generator(seed, "epoch", epoch))


def step_indices(n: int, global_batch: int, step: int, seed: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Indices (into a data set of size `n`) of `rank`'s share of optimizer step `step`.

    Returns a LongTensor of ``global_batch // world_size`` indices.
    """
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} does not divide by {world_size} processes")
    start, stop = step * global_batch, (step + 1) * global_batch
    pieces = []
    for epoch in range(start // n, (stop - 1) // n + 1):
        perm = epoch_permutation(n, seed, epoch)
        lo, hi = max(start, epoch * n) - epoch * n, min(stop, (epoch + 1) * n) - epoch * n
        pieces.append(perm[lo:hi])
    idx = torch.cat(pieces)
    per_rank = global_batch // world_size
    return idx[rank * per_rank:(rank + 1) * per_rank]


def step_index_stream(n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Tensor]:
    """`step_indices` of `rank` (``batch_size`` per process) for steps `start_step`, `start_step` + 1, ..., forever."""
    step = start_step
    while True:
        yield step_indices(n, batch_size * world_size, step, seed, rank, world_size)
        step += 1


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """A batch sampler for ``torch.utils.data.DataLoader`` yielding `step_indices` from `start_step` on, forever."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for index in step_index_stream(self.n, self.batch_size, self.seed, self.start_step, self.rank,
                                       self.world_size):
            yield index.tolist()


class TensorDataSource(DataSource):
    """A data source over in-memory tensors (train and held-out splits).

    Args:
        train: ``{"x": (N, ...), "y": (N,) optional}``.
        held_out: the same keys, examples never trained on.
        spec: what the tensors are.
    """

    def __init__(self, train: Mapping[str, Tensor], held_out: Mapping[str, Tensor], spec: DataSpec):
        self.train = dict(train)
        self.held_out = dict(held_out)
        self.spec = spec
        self._n = len(next(iter(self.train.values())))

    @property
    def num_examples(self) -> int:
        """Size of the training split (an epoch is this many examples)."""
        return self._n

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        for index in step_index_stream(self._n, batch_size, seed, start_step, rank, world_size):
            yield {k: v[index] for k, v in self.train.items()}  # index tensors directly: no list round trip

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        total = len(next(iter(self.held_out.values())))
        if n <= total:
            index = torch.randperm(total, generator=generator)[:n]
        else:
            index = torch.randint(total, (n,), generator=generator)
        return {k: v[index] for k, v in self.held_out.items()}
