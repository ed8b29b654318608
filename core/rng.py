"""Per-example random draws: a pure function of (seed, step, global example index).

Process-count invariance (DESIGN.md, "Scale") needs every random number that
touches an example (noise, time, label dropout, flips, masks) to depend only on
the run's seed, the optimizer step and the example's position in the *global*
batch, never on which rank or micro-batch the example landed in. A stateful
``torch.Generator`` per rank cannot give that, so draws here are counter based:

    bits(e, s, j) = mix(mix(e) xor mix(h(s) + j * golden)),

where ``e`` is the example's 64-bit seed (`example_seeds`), ``s`` a named
stream (``"noise"``, ``"time"``, ...), ``j`` the element's index within the
example and ``mix`` the SplitMix64 finaliser (Steele, Lea and Flood 2014):

    z <- (z xor z >> 30) * 0xBF58476D1CE4E5B9
    z <- (z xor z >> 27) * 0x94D049BB133111EB
    z <- z xor z >> 31                              (all mod 2^64, logical shifts)

Uniforms take the top 24 (float32) or 53 (float64) bits, ``u = (k + 1/2) 2^-b``
in the open interval (0, 1); normals use Box-Muller on two independent uniform
streams, ``sqrt(-2 ln u1) cos(2 pi u2)``. Everything is vectorised int64
arithmetic on the seeds' device (int64 products wrap mod 2^64 on CPU and CUDA),
so an example's numbers are the same whatever its batch, rank or device.

The trainer puts ``batch["seeds"]`` (``(B,)`` int64, `example_seeds`) into every
training batch; objectives draw through `for_batch`, which falls back to torch's
global RNG for batches without seeds (direct calls in tests and notebooks).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _C1, _C2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of an int64 tensor by `k` bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix(z: Tensor) -> Tensor:
    """SplitMix64's finaliser, elementwise on an int64 tensor (a bijection of 64-bit words)."""
    z = (z ^ _srl(z, 30)) * _C1
    z = (z ^ _srl(z, 27)) * _C2
    return z ^ _srl(z, 31)


def _mix_int(z: int) -> int:
    """`mix` of one Python integer (exact, unsigned)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return _signed(z ^ (z >> 31))


def stream_id(name: str) -> int:
    """A stable 64-bit word for a stream name (CRC-32 spread by `mix`)."""
    return _mix_int(zlib.crc32(name.encode()) * 0x9E3779B97F4A7C15 + 1)


def example_seeds(seed: int, step: int, index: Tensor) -> Tensor:
    """Seeds of the examples at global batch positions `index` of optimizer step `step`.

    Args:
        seed: the run's seed.
        step: the optimizer step (0-based).
        index: ``(B,)`` integer tensor, positions in the global batch (0 .. G-1).
    Returns:
        ``(B,)`` int64 tensor on `index`'s device.
    """
    base = _mix_int(_mix_int(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) ^ (step & _M64))
    return mix(index.to(torch.int64) * _GOLDEN + base)


def shard_positions(per_process: int, rank: int, device: Any = None) -> Tensor:
    """Global batch positions ``(per_process,)`` of `rank`'s contiguous share: ``rank * per_process + arange``.

    The same rule as `core.data.step_indices`: rank ``r`` of ``W`` holds positions
    ``[r P, (r + 1) P)`` of the global batch of ``W P`` examples.
    """
    start = rank * per_process
    return torch.arange(start, start + per_process, device=device, dtype=torch.int64)


def shard_seeds(seed: int, step: int, per_process: int, rank: int = 0, device: Any = None) -> Tensor:
    """`example_seeds` of `rank`'s share of step `step` (``(per_process,)`` int64)."""
    return example_seeds(seed, step, shard_positions(per_process, rank, device))


def bits(seeds: Tensor, shape: Sequence[int], stream: str, offset: int = 0) -> Tensor:
    """Random 64-bit words ``(B, *shape)`` for examples with `seeds` (``(B,)`` int64) in `stream`."""
    n = math.prod(shape)
    counter = torch.arange(offset, offset + n, device=seeds.device, dtype=torch.int64)
    key = mix(counter * _GOLDEN + stream_id(stream))
    return mix(mix(seeds.reshape(-1, 1)) ^ key).reshape(seeds.shape[0], *shape)


def uniform(seeds: Tensor, shape: Sequence[int], stream: str, dtype: torch.dtype = torch.float32,
            offset: int = 0) -> Tensor:
    """Uniform draws on the open interval (0, 1), ``(B, *shape)``."""
    width = 53 if dtype == torch.float64 else 24
    k = _srl(bits(seeds, shape, stream, offset), 64 - width)
    return ((k.to(torch.float64 if width == 53 else torch.float32) + 0.5) * 2.0 ** -width).to(dtype)


def normal(seeds: Tensor, shape: Sequence[int], stream: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws ``(B, *shape)`` by Box-Muller on two uniform streams."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u1 = uniform(seeds, shape, stream + "/r", work)
    u2 = uniform(seeds, shape, stream + "/theta", work)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).to(dtype)


def randint(seeds: Tensor, low: int, high: int, shape: Sequence[int], stream: str) -> Tensor:
    """Integers uniform on ``[low, high)``, ``(B, *shape)`` int64 (bias below ``(high - low) / 2^63``)."""
    return low + _srl(bits(seeds, shape, stream), 1) % (high - low)


class ExampleRandom:
    """Draws for one batch of examples, keyed by their seeds; method names follow torch's.

    Every method takes a `stream` name: two draws of one batch must use different streams.
    Shapes given to `rand`/`randn`/`randint` are per example; results are ``(B, *shape)``.
    """

    def __init__(self, seeds: Tensor):
        self.seeds = seeds

    def rand(self, shape: Sequence[int], stream: str, *, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return uniform(self._on(device), tuple(shape), stream, dtype)

    def randn(self, shape: Sequence[int], stream: str, *, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return normal(self._on(device), tuple(shape), stream, dtype)

    def randint(self, low: int, high: int, shape: Sequence[int], stream: str, *, device: Any = None) -> Tensor:
        return randint(self._on(device), low, high, tuple(shape), stream)

    def rand_like(self, x: Tensor, stream: str) -> Tensor:
        """Uniforms shaped like `x` (``(B, ...)``), on its device and dtype."""
        return self.rand(x.shape[1:], stream, device=x.device, dtype=x.dtype)

    def randn_like(self, x: Tensor, stream: str) -> Tensor:
        """Standard normals shaped like `x` (``(B, ...)``), on its device and dtype."""
        return self.randn(x.shape[1:], stream, device=x.device, dtype=x.dtype)

    def _on(self, device: Any) -> Tensor:
        return self.seeds if device is None else self.seeds.to(device)


class GlobalRandom(ExampleRandom):
    """The same methods drawing from torch's global RNG (for batches without ``"seeds"``)."""

    def __init__(self, batch_size: int, generator: torch.Generator | None = None):
        self.batch_size, self.generator = batch_size, generator

    def rand(self, shape: Sequence[int], stream: str, *, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.rand(self.batch_size, *shape, device=device, dtype=dtype, generator=self.generator)

    def randn(self, shape: Sequence[int], stream: str, *, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(self.batch_size, *shape, device=device, dtype=dtype, generator=self.generator)

    def randint(self, low: int, high: int, shape: Sequence[int], stream: str, *, device: Any = None) -> Tensor:
        return torch.randint(low, high, (self.batch_size, *shape), device=device, generator=self.generator)


def standard_normal(shape: Sequence[int], generator: torch.Generator | None = None, device: Any = None, *,
                    dtype: torch.dtype | None = None, draw: ExampleRandom | None = None, stream: str = "noise") -> Tensor:
    """``(B, ...)`` standard normals of the full `shape`: the Gaussian source ``x_0 ~ N(0, I)`` of a path.

    With `draw` (a batch's `for_batch`) every example's draw is keyed by its seed and `stream`, on
    `device` in `dtype` (default float32); without it they come from `generator` (torch's global RNG
    when None) on the CPU, moved to `device` (and cast to `dtype` when one is given).
    """
    if draw is not None:
        return draw.randn(tuple(shape)[1:], stream, device=device, dtype=dtype or torch.float32)
    x = torch.randn(*shape, generator=generator).to(device or "cpu")
    return x if dtype is None else x.to(dtype)


def for_batch(batch: Mapping[str, Any], batch_size: int | None = None) -> ExampleRandom:
    """The draws of a training batch: keyed by ``batch["seeds"]`` when present, else torch's global RNG.

    `batch_size` is needed only for the fallback when the batch has no ``"x"``.
    """
    seeds = batch.get("seeds")
    if seeds is not None:
        return ExampleRandom(seeds)
    if batch_size is None:
        batch_size = int(batch["x"].shape[0])
    return GlobalRandom(batch_size)
