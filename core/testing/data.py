"""Conformance checks for data sources (`core.interfaces.DataSource`).

::

    from core.testing.data import check_data_source
    check_data_source(registry.build("data", {"plugin": "mine"}), name="mine")

The invariants, each named in the ``AssertionError`` that reports it:

``spec``
    ``data.spec`` is a `DataSpec` with a tuple shape and kind ``continuous``
    or ``discrete``; ``num_examples`` is a positive int or None (endless).
``shapes match spec``
    Every batch is a mapping of tensors with ``batch_size`` rows;
    ``batch["x"]`` is ``(B, *spec.shape)``, floating for continuous data and
    integer token ids in ``[0, vocab_size)`` for discrete data;
    ``batch["y"]`` (class-conditional data) is ``(B,)`` labels in
    ``[0, num_classes)``. The same holds for ``reference(n, generator)``.
``deterministic in (seed, step, rank)``
    Two streams with the same arguments yield the same batches, whatever the
    global RNG state; successive steps differ, and so do different seeds.
``resume from start_step``
    ``train_batches(..., start_step=k)`` starts with the batch step ``k`` of
    a stream started at 0 (a resumed run sees the same data).
``ranks partition the global batch``
    With ``world_size`` processes each rank gets ``batch_size`` examples and
    the ranks get different examples. With ``exact_partition=True`` the ranks'
    batches together are exactly (as a multiset) the batch one process would
    get with ``world_size * batch_size`` (what `core.data` guarantees for data
    sets held in memory; generative toy sources draw per rank instead).
``reference draws``
    ``reference(n, g)`` returns ``n`` examples, is a function of the
    generator's state alone, and independent generators give different draws.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from core.interfaces import DataSpec

from .invariants import checking as _checking
from .invariants import require as _require


def _take(data: Any, n: int, batch_size: int, **kwargs: Any) -> list[Mapping[str, Tensor]]:
    stream = data.train_batches(batch_size, **kwargs)
    return list(itertools.islice(stream, n))


def _equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, Tensor):
            if not isinstance(y, Tensor) or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _rows(batch: Mapping[str, Any]) -> list[tuple]:
    """Each example as a hashable tuple of all its tensor values (sorted keys)."""
    keys = sorted(k for k, v in batch.items() if isinstance(v, Tensor))
    n = len(batch[keys[0]]) if keys else 0
    flat = [batch[k].reshape(n, -1).double().tolist() for k in keys]
    return [tuple(itertools.chain.from_iterable(f[i] for f in flat)) for i in range(n)]


def check_batch(batch: Any, spec: DataSpec, n: int, who: str, what: str = "a training batch") -> None:
    """``shapes match spec`` for one batch of `n` examples."""
    inv = "shapes match spec"
    _require(isinstance(batch, Mapping) and len(batch) > 0, who, inv,
             f"{what} is {type(batch).__name__}, expected a dict of tensors")
    for key, value in batch.items():
        _require(isinstance(value, Tensor), who, inv, f"{what}[{key!r}] is a {type(value).__name__}, not a Tensor")
        _require(value.ndim >= 1 and value.shape[0] == n, who, inv,
                 f"{what}[{key!r}] has shape {tuple(value.shape)}, expected {n} rows")
    x = batch.get("x")
    if x is not None:
        want = (n, *spec.shape)
        _require(tuple(x.shape) == want, who, inv,
                 f"{what}['x'] has shape {tuple(x.shape)}, expected (B, *spec.shape) = {want}")
        if spec.kind == "discrete":
            _require(not x.dtype.is_floating_point and not x.dtype.is_complex, who, inv,
                     f"discrete data must be integer token ids, got {x.dtype}")
            if spec.vocab_size > 0 and x.numel():
                lo, hi = int(x.min()), int(x.max())
                _require(0 <= lo and hi < spec.vocab_size, who, inv,
                         f"token ids in [{lo}, {hi}] fall outside [0, vocab_size) = [0, {spec.vocab_size})")
        else:
            _require(x.dtype.is_floating_point, who, inv, f"continuous data must be floating point, got {x.dtype}")
            _require(bool(torch.isfinite(x).all()), who, inv, f"{what}['x'] has non-finite values")
    y = batch.get("y")
    if y is not None and spec.num_classes > 0:
        _require(tuple(y.shape) == (n,), who, inv, f"{what}['y'] has shape {tuple(y.shape)}, expected ({n},)")
        _require(not y.dtype.is_floating_point, who, inv, f"labels must be integers, got {y.dtype}")
        if y.numel():
            lo, hi = int(y.min()), int(y.max())
            _require(0 <= lo and hi < spec.num_classes, who, inv,
                     f"labels in [{lo}, {hi}] fall outside [0, num_classes) = [0, {spec.num_classes})")


def check_data_source(data: Any, *, name: str | None = None, batch_size: int = 4, seed: int = 0, steps: int = 3,
                      world_size: int = 2, exact_partition: bool = False, reference_size: int = 16) -> None:
    """Run every data-source check (see the module docstring)."""
    who = f"data {name or type(data).__name__!r}"
    spec = _check_spec(data, who)
    first = _check_streams(data, spec, who, batch_size, seed, steps)
    inv = "resume from start_step"
    for start in range(1, steps):
        with _checking(who, inv):
            resumed = _take(data, 1, batch_size, seed=seed, start_step=start)[0]
        _require(_equal(resumed, first[start]), who, inv,
                 f"a stream started at start_step={start} does not begin with the batch of step {start}")
    if world_size > 1:
        for step in range(min(steps, 2)):
            _check_partition(data, spec, who, batch_size, seed, step, world_size, exact_partition)
    _check_reference(data, spec, who, reference_size)


def _check_spec(data: Any, who: str) -> DataSpec:
    """'spec': a DataSpec of positive ints, a known kind; num_examples a positive int or None."""
    spec = getattr(data, "spec", None)
    _require(isinstance(spec, DataSpec), who, "spec", f"data.spec is {type(spec).__name__}, expected a DataSpec")
    _require(isinstance(spec.shape, tuple) and all(isinstance(s, int) and s > 0 for s in spec.shape), who, "spec",
             f"spec.shape {spec.shape!r} is not a tuple of positive ints")
    _require(spec.kind in ("continuous", "discrete"), who, "spec", f"spec.kind is {spec.kind!r}")
    if spec.kind == "discrete":
        _require(spec.vocab_size > 0, who, "spec", "discrete data needs spec.vocab_size > 0")
    count = getattr(data, "num_examples", None)
    _require(count is None or (isinstance(count, int) and count > 0), who, "spec",
             f"num_examples is {count!r}: the size of the training split (a positive int) "
             f"or None for an endless source")
    return spec


def _check_streams(data: Any, spec: DataSpec, who: str, batch_size: int, seed: int, steps: int) -> list[Any]:
    """'deterministic in (seed, step, rank)': endless, valid batches that depend on the seed and step
    only (not on torch's global RNG); the first `steps` batches."""
    inv = "deterministic in (seed, step, rank)"
    with _checking(who, inv), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        first = _take(data, steps, batch_size, seed=seed)
        torch.manual_seed(2)
        second = _take(data, steps, batch_size, seed=seed)
    _require(len(first) == steps, who, inv, f"train_batches stopped after {len(first)} batches; it must be endless")
    for k, batch in enumerate(first):
        check_batch(batch, spec, batch_size, who, f"the batch of step {k}")
    for k, (a, b) in enumerate(zip(first, second)):
        _require(_equal(a, b), who, inv, f"two streams with seed={seed} differ at step {k} "
                                          f"(draw with a generator seeded from (seed, step, rank), not the global RNG)")
    for k in range(steps - 1):
        _require(not _equal(first[k], first[k + 1]), who, inv, f"steps {k} and {k + 1} yield the same batch")
    with _checking(who, inv):
        other_seed = _take(data, 1, batch_size, seed=seed + 1)[0]
    _require(not _equal(first[0], other_seed), who, inv, f"seeds {seed} and {seed + 1} yield the same first batch")
    return first


def _check_partition(data: Any, spec: DataSpec, who: str, batch_size: int, seed: int, step: int, world_size: int,
                     exact_partition: bool) -> None:
    """'ranks partition the global batch' at `step`: the ranks' batches overlap in fewer than half their
    examples (with `exact_partition`: together they are one process's batch of ``world_size * batch_size``)."""
    inv = "ranks partition the global batch"
    with _checking(who, inv):
        parts = [_take(data, 1, batch_size, seed=seed, start_step=step, rank=r, world_size=world_size)[0]
                 for r in range(world_size)]
    for r, part in enumerate(parts):
        check_batch(part, spec, batch_size, who, f"rank {r}'s batch of step {step}")
    rows = [_rows(p) for p in parts]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            common = len(set(rows[a]) & set(rows[b]))
            _require(common * 2 < batch_size, who, inv,
                     f"ranks {a} and {b} of {world_size} share {common} of {batch_size} examples "
                     f"at step {step}")
    if exact_partition:
        with _checking(who, inv):
            whole = _take(data, 1, batch_size * world_size, seed=seed, start_step=step)[0]
        union = sorted(itertools.chain.from_iterable(rows))
        _require(union == sorted(_rows(whole)), who, inv,
                 f"at step {step} the {world_size} ranks' batches together are not the batch of one process "
                 f"with batch_size {batch_size * world_size}")


def _check_reference(data: Any, spec: DataSpec, who: str, reference_size: int) -> None:
    """'reference draws': valid, reproducible with equally seeded generators, different with independent ones."""
    inv = "reference draws"
    with _checking(who, inv), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        ref_a = data.reference(reference_size, torch.Generator().manual_seed(11))
        torch.manual_seed(2)
        ref_a2 = data.reference(reference_size, torch.Generator().manual_seed(11))
        ref_b = data.reference(reference_size, torch.Generator().manual_seed(12))
    check_batch(ref_a, spec, reference_size, who, f"reference({reference_size}, generator)")
    _require(_equal(ref_a, ref_a2), who, inv, "two reference() calls with equally seeded generators differ "
                                               "(draw with the generator, not the global RNG)")
    _require(not _equal(ref_a, ref_b), who, inv, "reference() calls with independent generators give the same examples")
