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
import queue
import threading
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


def reference_index(total: int, n: int, generator: torch.Generator) -> Tensor:
    """Rows of a held-out split of `total` rows that ``reference(n, generator)`` returns, ``(n,)``: a random
    subset without replacement when ``n <= total`` (all of them, permuted, when ``n == total``), else
    ``n`` draws with replacement."""
    if n <= total:
        return torch.randperm(total, generator=generator)[:n]
    return torch.randint(total, (n,), generator=generator)


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
        index = reference_index(len(next(iter(self.held_out.values()))), n, generator)
        return {k: v[index] for k, v in self.held_out.items()}

    def reference_slice(self, n: int, seed: int, start: int, stop: int) -> Batch:
        index = reference_index(len(next(iter(self.held_out.values()))), n, torch.Generator().manual_seed(seed))
        return {k: v[index[start:stop]] for k, v in self.held_out.items()}


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device` without blocking the host: a CPU tensor bound for CUDA is pinned first (a
    copy from pageable memory would wait for the stream to drain)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class _End:
    """Marks the end of a prefetched stream."""


def _side_copy(batch: Batch, device: torch.device, stream: Any) -> tuple[Batch, Any]:
    """`batch` copied to the CUDA `device` on `stream`, and the event that marks the copy done."""
    with torch.cuda.stream(stream):
        moved = {k: to_device(v, device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        done = torch.cuda.Event()
        done.record(stream)
    return moved, done


def _wait_for_copy(batch: Batch, done: Any, device: torch.device) -> None:
    """Make the current stream wait for the side-stream copy `done` of `batch` and own its memory."""
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    for v in batch.values():
        if isinstance(v, Tensor) and v.device.type == "cuda":
            v.record_stream(current)  # the side stream's memory is in use on this one


def device_prefetch(batches: Iterator[Batch], device: torch.device | str, depth: int = 2) -> Iterator[Batch]:
    """Yield `batches` moved to `device`, drawn up to `depth` batches ahead by a background thread.

    On CUDA the thread pins each batch's CPU tensors and copies them on a side stream; the consumer's
    current stream waits for that copy (an event), so neither the host nor the device waits for the
    transfer. Elsewhere the thread only draws the batches ahead. The order is that of `batches`;
    an exception raised while drawing is raised by the consumer at that batch; closing the generator
    (or dropping it) stops and joins the thread, then closes `batches`.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not put(_side_copy(batch, device, stream) if cuda else (batch, None)):
                    return
            put(_End)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=work, name="flowforge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _End:
                return
            if isinstance(item, BaseException):
                raise item
            batch, done = item
            if done is not None:
                _wait_for_copy(batch, done, device)
            yield batch
    finally:
        stop.set()  # the thread returns at its next hand-over; wait for it (it may be mid-copy) ...
        while thread.is_alive():
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # ... then release the source (a DataLoader's worker processes)
