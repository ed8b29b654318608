"""UniPC (Zhao et al. 2023): the unified predictor-corrector in data-prediction form, B(h) = h (bh1) or e^h - 1 (bh2).

With ``hh = -h`` (``h = lambda_t - lambda_{s_0}``), ``phi_1 = e^{hh} - 1``, the predictor UniP-p from
``x`` at ``s_0`` (data predictions ``m_0`` at ``s_0``, ``m_i`` at earlier points, ``r_i =
(lambda_{s_i} - lambda_{s_0}) / h``, ``D_i = (m_i - m_0) / r_i``) is

    x_t = (sigma_t / sigma_s0) x - alpha_t phi_1 m_0 - alpha_t B(h) sum_i rho_i D_i,

``rho`` solving ``R rho = b`` with ``R_{ki} = r_i^k`` and ``b_k = k! h phi_{k+1}(hh) / B(h)``
(``h phi_{k+1}`` by the recursion ``hphi_{k+1} = hphi_k / hh - 1 / (k+1)!``); order 2 uses
``rho = 1/2``. The corrector UniC-p, after the model is evaluated at the new state ``x_t``
(prediction ``m_t``), recomputes the same step with ``r = 1`` appended for ``D_t = m_t - m_0``
(``rho = 1/2`` at order 1) and replaces ``x_t``. Orders warm up from 1; with
``lower_order_final`` the order at step ``i`` of ``n`` is at most ``n - i``. The last state is not
corrected (no model call follows it); ``disable_corrector`` lists steps whose corrector is skipped.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from registry import ConfigError

from .sampling import Denoiser, GridConfig, SigmaSolver
from .spacing import vp_coefficients


@attrs.define
class UniPCConfig(GridConfig):
    """Options of the unipc solver (GridConfig's plus these).

    Attributes:
        order: predictor order 1 .. 3 (diffusers' solver_order; 2 for guided sampling, 3 unconditional).
        solver_type: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1).
        lower_order_final: lower the order at the last steps (at most n - i at step i).
        disable_corrector: steps (0-based) whose corrector is skipped.
    """

    order: int = 2
    solver_type: Literal["bh1", "bh2"] = "bh2"
    lower_order_final: bool = True
    disable_corrector: list[int] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.order not in (1, 2, 3):
            raise ConfigError(f"expected order 1, 2 or 3, got {self.order}", ("order",))


def unipc_rhs(rks: Tensor, hh: Tensor, order: int, solver_type: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(R (order, order), b (order,), phi_1, B(h))`` of UniPC's linear system (module docstring)."""
    h_phi_1 = torch.expm1(hh)
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    h_phi_k, rows, b = h_phi_1 / hh - 1.0, [], []
    for k in range(1, order + 1):
        rows.append(rks ** (k - 1))
        b.append(h_phi_k * math.factorial(k) / b_h)
        h_phi_k = h_phi_k / hh - 1.0 / math.factorial(k + 1)
    return torch.stack(rows), torch.stack(b), h_phi_1, b_h


def unipc_update(x: Tensor, sigma_t: Tensor, sigmas_s: list[Tensor], ms: list[Tensor], solver_type: str,
                 m_t: Tensor | None = None) -> Tensor:
    """UniP (``m_t`` None) or UniC (``m_t`` the prediction at the predicted state) from ``x`` at ``sigmas_s[0]``.

    ``sigmas_s``, ``ms`` newest first; their length is the order.
    """
    alpha_t, sig_t, lam_t = vp_coefficients(sigma_t)
    _, sig_s0, lam_s0 = vp_coefficients(sigmas_s[0])
    h = lam_t - lam_s0
    order = len(ms)
    rks = [(vp_coefficients(s)[2] - lam_s0) / h for s in sigmas_s[1:]]
    ds = [(m - ms[0]) / r for m, r in zip(ms[1:], rks)]
    rks_t = torch.stack(rks + [torch.ones((), dtype=h.dtype)])
    R, b, h_phi_1, b_h = unipc_rhs(rks_t, -h, order, solver_type)
    x_t = sig_t / sig_s0 * x - alpha_t * h_phi_1 * ms[0]
    if m_t is None:
        if ds:
            rhos = torch.full((1,), 0.5, dtype=h.dtype) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = x_t - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos.to(x.dtype), ds))
        return x_t
    rhos = torch.full((1,), 0.5, dtype=h.dtype) if order == 1 else torch.linalg.solve(R, b)
    rhos = rhos.to(x.dtype)
    correction = sum((rho * d for rho, d in zip(rhos[:-1], ds)), torch.zeros_like(x)) + rhos[-1] * (m_t - ms[0])
    return x_t - alpha_t * b_h * correction


class UniPCSolver(SigmaSolver):
    """See the module docstring (``unipc``)."""

    method = "unipc"

    def __init__(self, config: UniPCConfig | None = None, path: Any = None):
        super().__init__(config or UniPCConfig(), path)

    def run(self, denoise: Denoiser, x: Tensor, generator: torch.Generator | None, traj: list[Tensor] | None) -> Tensor:
        c, sig, n = self.config, self.sigmas.to(x.device), self.config.steps
        ms: list[Tensor] = []
        last: tuple[Tensor, int] | None = None  # (the state before the last predictor, its order)
        for i in range(n):
            m = denoise(x, sig[i], self.steps[i])
            if last is not None and i - 1 not in c.disable_corrector:
                x_prev, order = last
                x = unipc_update(x_prev, sig[i], [sig[i - 1 - j] for j in range(order)], ms[:order], c.solver_type, m)
                if traj is not None:
                    traj[-1] = x
            ms = [m] + ms[:c.order - 1]
            order = min(c.order, n - i if c.lower_order_final else c.order, len(ms))
            last = (x, order)
            x = unipc_update(x, sig[i + 1], [sig[i - j] for j in range(order)], ms[:order], c.solver_type)
            if traj is not None:
                traj.append(x)
        return x


def make_unipc(config: UniPCConfig | None = None, path: Any = None) -> UniPCSolver:
    """Solver factory for ``plugin = "unipc"``."""
    return UniPCSolver(config, path)
