"""The few collectives that evaluation and sampling need, a no-op on one process.

`Group` wraps ``torch.distributed`` (when initialised with more than one
process) so the same code runs on 1 or N processes: ``gather_cat`` concatenates
every rank's rows in rank order (ranks may hold different numbers of rows, none
is padded into the result), ``gather_objects`` / ``broadcast`` move small
Python values, ``barrier`` waits for every rank.

`local_metrics()` is a context in which first-party torchmetrics metrics do
not synchronise their states across processes (`sync_allowed` is their
``distributed_available_fn``): evaluation gathers features itself, and metrics
computed on one rank only must not wait for the others.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("flowforge_local_metrics", default=False)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def sync_allowed() -> bool:
    """Whether a metric may synchronise across processes now (torchmetrics' ``distributed_available_fn``)."""
    return _initialized() and not _LOCAL.get()


@contextlib.contextmanager
def local_metrics() -> Iterator[None]:
    """Within this context, metrics built with `sync_allowed` compute over this process's states only."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


class Group:
    """This process's place among the processes of the job (``rank`` in ``[0, world_size)``)."""

    def __init__(self, rank: int | None = None, world_size: int | None = None):
        import torch.distributed as dist

        init = _initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if init else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if init else 1)
        if self.world_size > 1 and not init:
            raise RuntimeError(f"world_size = {self.world_size} but torch.distributed is not initialised")
        self.active = self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def gather_cat(self, rows: Tensor) -> Tensor:
        """Every rank's ``rows (N_r, ...)`` concatenated in rank order, ``(sum N_r, ...)``, on every rank (CPU).
        A rank may hold no rows (any empty tensor): the dtype and trailing shape are those of the others."""
        rows = rows.detach()
        if not self.active:
            return rows.cpu()
        import torch.distributed as dist

        shapes = self.gather_objects((int(rows.shape[0]), str(rows.dtype).removeprefix("torch."), tuple(rows.shape[1:])))
        counts = [c for c, _, _ in shapes]
        _, dtype, trailing = max(shapes, key=lambda s: s[0])  # a rank without rows may not know the dtype
        device = self._device()
        rows = rows.reshape(rows.shape[0], *trailing).to(getattr(torch, dtype))
        padded = torch.zeros((max(counts), *trailing), dtype=rows.dtype, device=device)
        padded[: rows.shape[0]] = rows.to(device)
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])

    def gather_objects(self, value: Any) -> list[Any]:
        """``[value of rank 0, value of rank 1, ...]`` on every rank (small picklable values)."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def blocks(n: int, block_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
    """`rank`'s share of the blocks ``[k B, min(n, (k + 1) B))`` of ``range(n)``: a contiguous run of whole
    blocks (the first ``(#blocks mod world_size)`` ranks take one more), so the blocks, and what is computed
    per block, are the same on any number of processes, and rank order is global order."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    count = -(-n // block_size)
    lo = rank * (count // world_size) + min(rank, count % world_size)
    hi = lo + count // world_size + (1 if rank < count % world_size else 0)
    return [(k * block_size, min(n, (k + 1) * block_size)) for k in range(lo, hi)]


def close_process_group() -> None:
    """Free what still refers to the process group (autograd nodes of differentiable collectives), then
    destroy it: left to interpreter shutdown, gloo's threads can be torn down in the wrong order and abort."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
