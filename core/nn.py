"""Small building blocks shared by backbone plugins."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of times ``t`` (shape ``(B,)``) into ``(B, dim)``.

    ``emb[:, i] = cos(scale * t * f_i)`` and ``emb[:, half + i] = sin(scale * t * f_i)`` with
    frequencies ``f_i = max_period ** (-i / half)``. ``scale`` maps t in [0, 1] to
    the range the sinusoids were designed for (DDPM's 0..1000 steps).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def integer_step(t: Tensor, steps: int) -> Tensor:
    """flowforge time ``t (B,)`` -> the DDPM step ``k = T (1 - t) - 1`` (``T`` = `steps`) a DDPM plugin sampled
    it from (``t = 1 - (k + 1) / T``), computed in float64 and snapped to the nearest integer within 1e-3 (the
    float32 round trip); fractional steps stay fractional. float32 ``(B,)``."""
    k = steps * (1.0 - t.double()) - 1.0
    nearest = k.round()
    return torch.where((k - nearest).abs() < 1e-3, nearest, k).float()


def expand_t(t: Tensor | float, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """A time given as a float, a 0-d tensor or a ``(B,)`` tensor, as a ``(B,)`` tensor."""
    t = torch.as_tensor(t, device=device, dtype=dtype)
    return t.expand(batch) if t.ndim == 0 else t


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` with `ndim` dimensions, for broadcasting against data."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[torch.device]:
    """`model` in eval mode inside the block, its training flag restored after (also on an error);
    yields `model_device(model)`."""
    was_training = model.training
    model.eval()
    try:
        yield model_device(model)
    finally:
        model.train(was_training)

