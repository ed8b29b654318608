"""Arrays from a ``.npz`` file, and the step-indexed array source the image loaders share.

``npz`` reads ``x (N, ...)`` and optional labels ``y (N,)`` from a NumPy
archive (``np.savez(path, x=..., y=...)``; key names are options), e.g. DiT's
precomputed Stable-Diffusion VAE latents of ImageNet 256: ``x`` float16 or
float32 ``(N, 4, 32, 32)`` and ``y`` int64 ``(N,)`` class ids 0..999.

* Continuous form (float arrays, or ``form = "continuous"``): batches are
  ``x * scale + shift`` as float32 (e.g. ``scale = 0.18215`` for unscaled SD
  latents, or ``scale = 1/127.5, shift = -1`` for uint8 images).
* Discrete form (integer arrays, or ``form = "discrete"``): batches are the
  int64 token ids; ``vocab_size`` defaults to the largest id + 1.
* Held-out data: a second file of the same layout (``held_out``), else a
  seeded random ``held_out_fraction`` of the rows (0: none held out, and
  `reference` draws training rows: the protocol of FIDs computed against
  training-set statistics, as DiT's and EDM's are).
* Memory: members stored uncompressed (``np.savez``, not
  ``np.savez_compressed``) are memory-mapped (``mmap = true``): the 21 GB of
  ImageNet latents are paged in on demand and shared by every process on a
  machine through the page cache. Compressed members are read into memory.
* Arrays of Python objects are refused: reading never unpickles.

Batches are a pure function of (seed, step, rank, world size) through
`core.data.step_indices`; ``flip = true`` mirrors the last axis of a
per-step seeded half of the examples (the mask is drawn for the whole global
batch and sliced per rank, so ranks still partition the batch one process
would see). ``num_workers > 0`` assembles upcoming steps' batches in that
many background threads (indexing and conversion release the GIL).
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
import torch
from torch import Tensor

from core import rng
from core.data import generator as make_generator
from core.data import reference_index, step_indices
from core.interfaces import Batch, DataSource, DataSpec
from core.npzfile import read_npz
from registry import ConfigError

from .render import grid_png

#: What a .npz file must hold, for error messages.
NPZ_LAYOUT = ("a NumPy .npz archive (np.savez(path, x=..., y=...)) holding {x!r}: an (N, ...) numeric array "
              "and optionally {y!r}: (N,) integer class labels")


# --------------------------------------------------------------------------- shared helpers
def flip_mask(seed: int, step: int, per_rank: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Which of `rank`'s ``per_rank`` examples of step `step` are mirrored: BoolTensor ``(per_rank,)``.

    Each example's flip is its own draw (`core.rng`, stream ``"flip"``) keyed by (seed, step, its
    position in the global batch), the positions `step_indices` gives this rank, so the ranks'
    flips together are those of one process with the global batch.
    """
    return rng.uniform(rng.shard_seeds(seed, step, per_rank, rank), (), "flip") < 0.5


def prefetched(make: Callable[[int], Batch], start_step: int, workers: int, depth: int = 0) -> Iterator[Batch]:
    """``make(step)`` for ``step = start_step, start_step + 1, ...``, built `depth` steps ahead by `workers` threads.

    With ``workers = 0`` each batch is made when asked for. The order never changes: batches are
    a function of the step alone.
    """
    step = start_step
    if workers <= 0:
        while True:
            yield make(step)
            step += 1
    depth = depth or 2 * workers
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="flowforge-data") as pool:
        pending = collections.deque(pool.submit(make, s) for s in range(step, step + depth))
        step += depth
        try:
            while True:
                batch = pending.popleft().result()
                pending.append(pool.submit(make, step))
                step += 1
                yield batch
        finally:
            for future in pending:
                future.cancel()


def render_images(x: Tensor, y: Tensor | None, path: str, value_range: tuple[float, float] | None) -> list[str]:
    """Save image-shaped ``x (B, C, H, W)`` as a PNG grid (sorted by label when given); other shapes: nothing.

    1 and 3 channels are drawn as grey / RGB in `value_range`; other channel counts (e.g. 4-channel
    latents) show their first three channels, scaled to the batch's own range.
    """
    if x.ndim != 4:
        return []
    x = x.detach().float().cpu()
    if y is not None:
        x = x[torch.argsort(y.cpu(), stable=True)]
    if x.shape[1] not in (1, 3):
        x = x[:, :3] if x.shape[1] > 3 else x[:, :1]
        value_range = None
    if value_range is None:
        lo, hi = float(x.min()), float(x.max())
        value_range = (lo, hi if hi > lo else lo + 1.0)
    upscale = max(1, 128 // max(x.shape[-2:]))
    return [grid_png(x.clamp(*value_range), path, value_range, upscale=upscale)]


@attrs.define
class Split:
    """Rows of arrays forming one split.

    Attributes:
        x: ``(N, ...)`` examples (a NumPy array, possibly memory-mapped).
        y: ``(N,)`` integer labels, or None.
        index: the rows of ``x`` in this split (None: all of them).
    """

    x: np.ndarray
    y: np.ndarray | None = None
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x) if self.index is None else len(self.index)

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(x rows, y rows) at `positions` of the split, in that order (memory maps are read in file order)."""
        rows = positions if self.index is None else self.index[positions]
        if isinstance(self.x, np.memmap) and len(rows) > 1:
            order = np.argsort(rows, kind="stable")
            x = np.empty((len(rows), *self.x.shape[1:]), dtype=self.x.dtype)
            x[order] = self.x[rows[order]]
        else:
            x = self.x[rows]
        return x, (None if self.y is None else self.y[rows])


class ArraySource(DataSource):
    """Step-indexed batches from arrays (in memory or memory-mapped); see the module docstring.

    Args:
        train: the training split.
        held_out: the split `reference` draws from.
        spec: what the decoded examples are.
        decode: uint8 / float / int rows ``(B, ...)`` -> the tensor batches hold.
        flip: mirror the last axis of a seeded half of each training batch.
        num_workers: background threads assembling upcoming batches.
        value_range: the range of decoded continuous examples for pictures (None: the batch's own).
    """

    def __init__(self, train: Split, held_out: Split, spec: DataSpec, decode: Callable[[np.ndarray], Tensor], *,
                 flip: bool = False, num_workers: int = 0, value_range: tuple[float, float] | None = (-1.0, 1.0)):
        self.train, self.held_out, self.spec = train, held_out, spec
        self.decode, self.flip, self.num_workers, self.value_range = decode, flip, num_workers, value_range

    @property
    def num_examples(self) -> int:
        """Size of the training split (an epoch is this many examples)."""
        return len(self.train)

    def _batch(self, split: Split, positions: np.ndarray) -> dict[str, Tensor]:
        x, y = split.rows(positions)
        batch = {"x": self.decode(x)}
        if y is not None and self.spec.num_classes > 0:
            batch["y"] = torch.from_numpy(np.asarray(y, dtype=np.int64))
        return batch

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        n = len(self.train)

        def make(step: int) -> Batch:
            idx = step_indices(n, batch_size * world_size, step, seed, rank, world_size)
            batch = self._batch(self.train, idx.numpy())
            if self.flip:
                mask = flip_mask(seed, step, batch_size, rank, world_size)
                batch["x"][mask] = batch["x"][mask].flip(-1)
            return batch

        return prefetched(make, start_step, self.num_workers)

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        total = len(self.held_out)
        if n <= total:
            index = torch.randperm(total, generator=generator)[:n]
        else:
            index = torch.randint(total, (n,), generator=generator)
        return self._batch(self.held_out, index.numpy())

    def reference_slice(self, n: int, seed: int, start: int, stop: int) -> Batch:
        index = reference_index(len(self.held_out), n, torch.Generator().manual_seed(seed))[start:stop]
        return self._batch(self.held_out, index.numpy())

    def render(self, batch: Batch, path: str) -> list[str]:
        x = batch["x"]
        value_range = self.value_range
        if self.spec.kind == "discrete":
            x = x.float() / max(1, self.spec.vocab_size - 1) * 2.0 - 1.0
            value_range = (-1.0, 1.0)
        return render_images(x, batch.get("y"), path, value_range)


def split_fraction(n: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of ``n`` rows: a seeded random `fraction` held out, per class when labelled."""
    g = make_generator(seed, "held-out-split")
    held = np.zeros(n, dtype=bool)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for rows in groups:
        order = torch.randperm(len(rows), generator=g).numpy()
        held[rows[order[:round(len(rows) * fraction)]]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


# --------------------------------------------------------------------------- .npz reading
@attrs.define
class NpzConfig:
    """Options of the npz data source.

    Attributes:
        path: the training archive (.npz).
        x_key: name of the examples array ``(N, ...)`` in the archive.
        y_key: name of the labels array ``(N,)``; used when present (empty: ignore labels).
        held_out: an archive of the same layout with held-out examples (empty: split ``path``).
        held_out_fraction: share of ``path`` held out when ``held_out`` is empty (per class when labelled);
            0: nothing held out, `reference` draws training examples.
        split_seed: seed of that split.
        form: "auto" (floats: continuous, integers: discrete), "continuous" or "discrete".
        scale: continuous examples are ``x * scale + shift`` (e.g. 0.18215 for unscaled SD-VAE latents).
        shift: see ``scale``.
        vocab_size: discrete vocabulary (0: the largest id in the data + 1).
        num_classes: number of classes (0: the largest label + 1).
        flip: mirror the last axis of a seeded half of every training batch (horizontal flip for images).
        mmap: memory-map members stored uncompressed instead of reading them into memory.
        num_workers: background threads assembling upcoming batches (0: assemble on demand).
    """

    path: str
    x_key: str = "x"
    y_key: str = "y"
    held_out: str = ""
    held_out_fraction: float = 0.1
    split_seed: int = 0
    form: Literal["auto", "continuous", "discrete"] = "auto"
    scale: float = 1.0
    shift: float = 0.0
    vocab_size: int = 0
    num_classes: int = 0
    flip: bool = False
    mmap: bool = True
    num_workers: int = 0

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ConfigError(f"expected a fraction in [0, 1), got {self.held_out_fraction!r}", ("held_out_fraction",))
        for key in ("vocab_size", "num_classes", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"expected a non-negative integer, got {getattr(self, key)!r}", (key,))
        if not self.x_key:
            raise ConfigError("expected the name of the examples array", ("x_key",))


class Npz(ArraySource):
    """See the module docstring."""

    def __init__(self, config: NpzConfig):
        self.config = c = config
        layout = NPZ_LAYOUT.format(x=c.x_key, y=c.y_key or "y")
        keys = [c.x_key] + ([c.y_key] if c.y_key else [])
        optional = {c.y_key} if c.y_key == "y" else set()  # a renamed label key must exist
        train = read_npz(Path(c.path), keys, optional, c.mmap, ("path",), layout)
        self._check(train, c.path, ("path",), layout)
        if c.held_out:
            test = read_npz(Path(c.held_out), keys, optional, c.mmap, ("held_out",), layout)
            self._check(test, c.held_out, ("held_out",), layout)
            for key in keys:
                if (key in train) != (key in test):
                    raise ConfigError(f"{c.held_out!r} {'lacks' if key in train else 'has'} the array {key!r} "
                                      f"that {c.path!r} {'has' if key in train else 'lacks'}", ("held_out",))
            if train[c.x_key].shape[1:] != test[c.x_key].shape[1:]:
                raise ConfigError(f"examples of {c.held_out!r} are {test[c.x_key].shape[1:]}, those of {c.path!r} "
                                  f"{train[c.x_key].shape[1:]}", ("held_out",))
            tr, te = Split(train[c.x_key], train.get(c.y_key)), Split(test[c.x_key], test.get(c.y_key))
        elif c.held_out_fraction > 0:
            labels = train.get(c.y_key)
            rows_train, rows_test = split_fraction(len(train[c.x_key]), c.held_out_fraction, c.split_seed,
                                                   None if labels is None else np.asarray(labels))
            if len(rows_test) == 0 or len(rows_train) == 0:
                raise ConfigError(f"held_out_fraction {c.held_out_fraction} of {len(train[c.x_key])} examples leaves "
                                  f"an empty split", ("held_out_fraction",))
            tr = Split(train[c.x_key], train.get(c.y_key), rows_train)
            te = Split(train[c.x_key], train.get(c.y_key), rows_test)
        else:
            tr = te = Split(train[c.x_key], train.get(c.y_key))
        x = train[c.x_key]
        integer = np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_
        form = c.form if c.form != "auto" else ("discrete" if integer else "continuous")
        if form == "discrete" and not integer:
            raise ConfigError(f"form = \"discrete\" needs integer token ids; {c.x_key!r} of {c.path!r} is {x.dtype}", ("form",))
        vocab = 0
        if form == "discrete":
            top = max(int(s.x.max()) for s in (tr, te))
            if int(min(s.x.min() for s in (tr, te))) < 0:
                raise ConfigError(f"token ids of {c.x_key!r} must be non-negative", ("path",))
            vocab = c.vocab_size or top + 1
            if top >= vocab:
                raise ConfigError(f"token id {top} in the data is outside vocab_size {vocab}", ("vocab_size",))
        classes = 0
        if tr.y is not None:
            top = max(int(s.y.max()) if len(s.y) else -1 for s in (tr, te))
            classes = c.num_classes or top + 1
            if top >= classes:
                raise ConfigError(f"label {top} in the data is outside num_classes {classes}", ("num_classes",))
        spec = DataSpec(shape=tuple(int(s) for s in x.shape[1:]), kind=form, num_classes=classes, vocab_size=vocab,
                        extra={"source": str(c.path), "train_examples": len(tr), "held_out_examples": len(te)})
        decode = _decode_tokens if form == "discrete" else _Affine(c.scale, c.shift)
        # Pictures of uint8 images span their 256 levels; other arrays are drawn in each batch's own range.
        value_range = (c.shift, 255 * c.scale + c.shift) if x.dtype == np.uint8 else None
        super().__init__(tr, te, spec, decode, flip=c.flip, num_workers=c.num_workers, value_range=value_range)

    @staticmethod
    def _check(arrays: dict[str, np.ndarray], path: str, where: tuple[str, ...], layout: str) -> None:
        values = list(arrays.items())
        x_key, x = values[0]
        if x.ndim < 2 or len(x) == 0:
            raise ConfigError(f"array {x_key!r} of {path!r} has shape {x.shape}; expected {layout}", where)
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise ConfigError(f"array {x_key!r} of {path!r} has dtype {x.dtype}; expected numbers", where)
        for key, y in values[1:]:
            if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
                raise ConfigError(f"array {key!r} of {path!r} is {y.dtype} {y.shape}; expected ({len(x)},) integer "
                                  f"class labels, one per example", where)
            if len(y) and int(y.min()) < 0:
                raise ConfigError(f"array {key!r} of {path!r} holds negative labels", where)


def _decode_tokens(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.int64))


@attrs.frozen
class _Affine:
    """Rows -> float32 ``x * scale + shift`` (a class, so threads and pickling see plain data)."""

    scale: float
    shift: float

    def __call__(self, x: np.ndarray) -> Tensor:
        out = torch.from_numpy(np.asarray(x, dtype=np.float32))
        if self.scale != 1.0:
            out.mul_(self.scale)
        if self.shift != 0.0:
            out.add_(self.shift)
        return out


def make_npz(config: NpzConfig) -> Npz:
    """Data factory for ``plugin = "npz"``."""
    return Npz(config)
