r"""Uniform dequantisation and bits per dimension of ``b``-bit images, as the literature reports them.

Images of ``b``-bit levels ``k in {0, ..., 2^b - 1}`` are fed to flowforge in [-1, 1] as
``x = 2 k / (2^b - 1) - 1`` (``v / 127.5 - 1`` for 8 bits). A continuous density cannot
score them directly (a point mass has no density), so, as Theis et al. (2016), Ho et al.
(2019) and FFJORD do, each level is spread uniformly over its bin:

    x~ = 2 (k + u) / 2^b - 1,        u ~ U[0, 1)^D,

and the discrete likelihood of the levels is bounded by Jensen's inequality,

    -log P(k) <= E_u[-log p(x~)] + D log(2^b / 2),

where ``D log(2^b / 2)`` is the log-Jacobian of the scaling from level units (bins of width 1)
to [-1, 1] (bins of width ``2 / 2^b``). In bits per dimension:

    bpd = E_u[-log p(x~)] / (D ln 2) + (b - 1).

(Reporting ``-log p(x) / (D ln 2)`` of the undequantised [-1, 1] data instead, as the
``likelihood`` metric does without ``dequantize``, lands ``b - 1`` = 7 bits below this scale.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def to_levels(x: Tensor, bits: int = 8) -> Tensor:
    """The integer levels ``k (B, ...)`` (int64) of data ``x`` scaled as ``2 k / (2^b - 1) - 1``."""
    top = 2 ** bits - 1
    return torch.round((x.to(torch.float64) + 1.0) * (top / 2.0)).clamp_(0, top).to(torch.int64)


def dequantize(levels: Tensor, u: Tensor, bits: int = 8, dtype: torch.dtype = torch.float32) -> Tensor:
    """``x~ = 2 (k + u) / 2^b - 1`` ``(B, ...)`` in [-1, 1) for levels ``k`` and uniforms ``u`` of the same shape."""
    return (2.0 * (levels.to(torch.float64) + u.to(torch.float64)) / 2 ** bits - 1.0).to(dtype)


def dequantized_bits_per_dim(log_prob: Tensor, dim: int, bits: int = 8) -> Tensor:
    """``-log p(x~) / (D ln 2) + (b - 1)`` ``(B,)`` from ``log p(x~) (B,)`` in nats of D-dimensional data."""
    return -log_prob / (dim * math.log(2.0)) + (bits - 1)
