"""Exact fields for Gaussian data: ground truth for tests, likelihoods and solver benchmarks.

For data ``x_1 ~ N(mu, Sigma)`` in ``R^D``, source ``x_0 ~ N(0, I)`` and the affine
path ``x_t = alpha_t x_1 + sigma_t x_0``, the marginal ``p_t`` is
``N(alpha_t mu, C_t)`` with ``C_t = alpha_t^2 Sigma + sigma_t^2 I`` and the
marginal velocity ``E[d alpha x_1 + d sigma x_0 | x_t = x]`` is

    u_t(x) = d alpha_t mu + C_t^{-1} A_t (x - alpha_t mu),   A_t = d alpha_t alpha_t Sigma + d sigma_t sigma_t I

(``A_t`` and ``C_t`` are polynomials in ``Sigma``, so they commute). The
epsilon and x_1 predictions are the matching conditional expectations:

    E[x_1 | x_t] = mu + alpha_t Sigma C_t^{-1} (x - alpha_t mu),   E[x_0 | x_t] = sigma_t C_t^{-1} (x - alpha_t mu)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.interfaces import Scheduler


class GaussianFlow(nn.Module):
    """The exact marginal fields of a Gaussian data distribution under `scheduler`.

    Args:
        mean: ``(D,)``.
        cov: ``(D, D)`` symmetric positive definite.
        scheduler: the path's scheduler.
        prediction: what ``forward`` returns: "velocity", "epsilon" or "x1".

    ``forward(x, t, y=None)`` takes ``x (B, *shape)`` with ``prod(shape) = D`` and ``t (B,)``.
    ``Sigma = Q diag(lam) Q^T`` is diagonalised once, so every matrix above is
    ``Q diag(f(lam)) Q^T`` and a call costs two matrix products (no per-call solves).
    """

    def __init__(self, mean: Tensor, cov: Tensor, scheduler: Scheduler, prediction: str = "velocity"):
        super().__init__()
        if prediction not in ("velocity", "epsilon", "x1"):
            raise ValueError(f"unknown prediction {prediction!r}")
        lam, q = torch.linalg.eigh(cov.to(torch.float64))
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)
        self.register_buffer("lam", lam.to(cov.dtype))
        self.register_buffer("q", q.to(cov.dtype))
        self.scheduler, self.prediction = scheduler, prediction
        self.calls = 0

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _rotated(self, x: Tensor, t: Tensor):
        """Scheduler coefficients ``(B, 1)`` and ``z = Q^T (x - alpha mu)`` ``(B, D)``, ``lam`` ``(D,)``."""
        s = self.scheduler(t.to(x.dtype))
        a, b, da, db = (v.reshape(-1, 1) for v in (s.alpha_t, s.sigma_t, s.d_alpha_t, s.d_sigma_t))
        q, lam, mean = self.q.to(x.dtype), self.lam.to(x.dtype), self.mean.to(x.dtype)
        z = (x.reshape(x.shape[0], -1) - a * mean) @ q
        return a, b, da, db, z, lam, q, mean

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        a, b, da, db, z, lam, q, mean = self._rotated(x, t)
        c = a * a * lam + b * b  # eigenvalues of C_t, (B, D)
        if self.prediction == "velocity":
            out = da * mean + ((da * a * lam + db * b) / c * z) @ q.T
        elif self.prediction == "epsilon":
            out = (b / c * z) @ q.T
        else:
            out = mean + (a * lam / c * z) @ q.T
        return out.reshape(x.shape)

    def log_prob(self, x: Tensor, t: float | Tensor = 1.0) -> Tensor:
        """``log p_t(x)`` for ``x (B, *shape)``: the exact marginal density (``t = 1``: the data)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        a, b, _, _, z, lam, _, _ = self._rotated(x, t)
        c = a * a * lam + b * b
        return -0.5 * (z * z / c).sum(-1) - 0.5 * torch.log(c).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        """``n`` draws ``(n, D)`` from the data distribution."""
        z = torch.randn(n, self.dim, generator=generator, dtype=dtype)
        q, lam = self.q.to(dtype), self.lam.to(dtype)
        return self.mean.to(dtype) + (z * lam.sqrt()) @ q.T
