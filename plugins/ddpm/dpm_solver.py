"""DPM-Solver++ (Lu et al. 2022): multistep 1/2/3 (2M, 3M), their SDE variants, and singlestep 2S.

In log-SNR ``lambda = log(alpha / sigma_vp)`` with data predictions ``m_j`` at the
grid points ``s_j`` (newest ``m_0`` at ``s_0``), the step from ``s_0`` to ``t`` with
``h = lambda_t - lambda_{s_0}``, ``r_j = (lambda_{s_j} - lambda_{s_{j+1}}) / h`` is

    ODE:  x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) D_0 + C_1 D_1 + C_2 D_2
    SDE:  x_t = (sigma_t / sigma_s0) e^{-h} x + alpha_t (1 - e^{-2h}) D_0 + C_1 D_1 + C_2 D_2
                + sigma_t sqrt(1 - e^{-2h}) z

with ``D_0 = m_0``; second order ``D_1 = (m_0 - m_1) / r_0`` and
``C_1 = -alpha_t (e^{-h} - 1) / 2`` (midpoint) or ``alpha_t ((e^{-h} - 1)/h + 1)`` (heun),
SDE: ``alpha_t (1 - e^{-2h}) / 2`` or ``alpha_t ((1 - e^{-2h}) / (-2h) + 1)``; third order
``D_1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1)``, ``D_2 = (D1_0 - D1_1) / (r_0 + r_1)``
(``D1_j = (m_j - m_{j+1}) / r_j``), ``C_1`` the heun coefficient and
``C_2 = -alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2)`` (SDE: ``alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2)``).

Orders as diffusers' DPMSolverMultistepScheduler: warm-up from order 1; the last
step is first order when ``final_sigma = "zero"``, ``euler_at_final`` or
(``lower_order_final`` and fewer than 15 steps), and the one before it at most
second order in the last case. Singlestep (``multistep = false``): the grid is
cut into groups of orders (1, 2) (diffusers' order list) and each group
jumps from its first state using the prediction at its intermediate grid point.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from registry import ConfigError

from .sampling import Denoiser, GridConfig, SigmaSolver, noise_like
from .spacing import vp_coefficients


@attrs.define
class DPMSolverConfig(GridConfig):
    """Options of the dpm_solver solver (GridConfig's plus these).

    Attributes:
        order: 1, 2 (2M / 2S) or 3 (3M; multistep only).
        multistep: multistep (DPM-Solver++(2M)) or singlestep (DPM-Solver++(2S)).
        sde: the SDE variant (sde-dpmsolver++), stochastic.
        solver_type: "midpoint" or "heun" second-order coefficient.
        lower_order_final: lower orders at the last steps for fewer than 15 steps.
        euler_at_final: a first-order last step whatever the number of steps.
    """

    order: int = 2
    multistep: bool = True
    sde: bool = False
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.order not in (1, 2, 3):
            raise ConfigError(f"expected order 1, 2 or 3, got {self.order}", ("order",))
        if not self.multistep and (self.sde or self.order == 3):
            raise ConfigError("singlestep (multistep = false) is DPM-Solver++(2S): order 1 or 2, no sde",
                              ("order" if self.order == 3 else "sde",))


def dpmpp_update(x: Tensor, sigma_t: Tensor, sigmas_s: list[Tensor], ms: list[Tensor], *, sde: bool = False,
                 solver_type: str = "midpoint", noise: Tensor | None = None) -> Tensor:
    """One DPM-Solver++ step from ``x`` at ``sigmas_s[0]`` to `sigma_t` (module docstring).

    ``sigmas_s`` and ``ms`` are newest first; their length (1, 2 or 3) is the order.
    """
    alpha_t, sig_t, lam_t = vp_coefficients(sigma_t)
    _, sig_s0, lam_s0 = vp_coefficients(sigmas_s[0])
    h = lam_t - lam_s0
    em = torch.expm1(-2.0 * h if sde else -h)  # e^{-h} - 1, or e^{-2h} - 1 for the SDE
    ratio = sig_t / sig_s0 * (torch.exp(-h) if sde else 1.0)
    c0 = -alpha_t * em
    x_t = ratio * x + c0 * ms[0]
    if len(ms) > 1:
        lams = [vp_coefficients(s)[2] for s in sigmas_s]
        r0 = (lams[0] - lams[1]) / h
        d1 = (ms[0] - ms[1]) / r0
        heun = alpha_t * (em / (2.0 * h) + 1.0) if sde else alpha_t * (em / h + 1.0)
        if len(ms) == 2:
            c1 = heun if solver_type == "heun" else (0.5 * c0 if sde else -0.5 * alpha_t * em)
            x_t = x_t + c1 * d1
        else:
            r1 = (lams[1] - lams[2]) / h
            d1_1 = (ms[1] - ms[2]) / r1
            big_d1 = d1 + r0 / (r0 + r1) * (d1 - d1_1)
            d2 = (d1 - d1_1) / (r0 + r1)
            c2 = (alpha_t * ((-em - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if sde
                  else -alpha_t * ((em + h) / h ** 2 - 0.5))
            x_t = x_t + heun * big_d1 + c2 * d2
    if sde:
        x_t = x_t + sig_t * torch.sqrt(-em) * noise
    return x_t


def singlestep_orders(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """diffusers' order list of singlestep DPM-Solver: groups (1, 2) repeated over ``n`` steps."""
    cycle = list(range(1, order + 1))
    if not lower_order_final:
        orders = cycle * (n // order) + [1] * (n % order)
    elif order == 2:
        orders = cycle * (n // 2 - 1) + [1, 1] if n % 2 == 0 else cycle * (n // 2) + [1]
    else:
        orders = [1] * n
    if final_zero and orders:
        orders[-1] = 1
    return orders


class DPMSolver(SigmaSolver):
    """See the module docstring (``dpm_solver``)."""

    method = "dpm_solver"

    def __init__(self, config: DPMSolverConfig | None = None, path: Any = None):
        super().__init__(config or DPMSolverConfig(), path)

    def run(self, denoise: Denoiser, x: Tensor, generator: torch.Generator | None, traj: list[Tensor] | None) -> Tensor:
        if self.config.multistep:
            return self._multistep(denoise, x, generator, traj)
        return self._singlestep(denoise, x, traj)

    def _order(self, i: int, history: int) -> int:
        c, n = self.config, self.config.steps
        few = c.lower_order_final and n < 15
        if i == n - 1 and (c.euler_at_final or few or c.final_sigma == "zero"):
            return 1
        if i == n - 2 and few:
            return min(c.order, 2, history + 1)
        return min(c.order, history + 1)

    def _multistep(self, denoise: Denoiser, x: Tensor, generator: torch.Generator | None,
                   traj: list[Tensor] | None) -> Tensor:
        c, sig = self.config, self.sigmas.to(x.device)
        ms: list[Tensor] = []
        for i in range(c.steps):
            ms = [denoise(x, sig[i], self.steps[i])] + ms[:c.order - 1]
            order = self._order(i, len(ms) - 1)
            noise = None
            if c.sde:  # no noise enters the last step to sigma = 0
                noise = noise_like(x, generator) if sig[i + 1] > 0 else torch.zeros_like(x)
            x = dpmpp_update(x, sig[i + 1], [sig[i - j] for j in range(order)], ms[:order], sde=c.sde,
                             solver_type=c.solver_type, noise=noise)
            if traj is not None:
                traj.append(x)
        return x

    def _singlestep(self, denoise: Denoiser, x: Tensor, traj: list[Tensor] | None) -> Tensor:
        """DPM-Solver++(2S): a group (1, 2) steps ``s_a -> s_{a+1}`` at first order, then jumps again from
        ``x_{s_a}`` to ``s_{a+2}`` with ``D_1`` from the predictions at ``s_a`` and ``s_{a+1}``."""
        c, sig = self.config, self.sigmas.to(x.device)
        orders = singlestep_orders(c.steps, c.order, c.lower_order_final, c.final_sigma == "zero")
        start, m_start = x, None
        for i, order in enumerate(orders):
            m = denoise(x, sig[i], self.steps[i])
            if order == 1 or m_start is None:
                start, m_start = x, m
                x = dpmpp_update(x, sig[i + 1], [sig[i]], [m])
            else:  # [start, mid] in dpmpp_update's form gives D_1 = (m_mid - m_start) / r with r > 0
                x = dpmpp_update(start, sig[i + 1], [sig[i - 1], sig[i]], [m_start, m], solver_type=c.solver_type)
                m_start = None
            if traj is not None:
                traj.append(x)
        return x


def make_dpm_solver(config: DPMSolverConfig | None = None, path: Any = None) -> DPMSolver:
    """Solver factory for ``plugin = "dpm_solver"``."""
    return DPMSolver(config, path)
