"""Inference time grids for the sigma-space diffusion solvers: timestep spacings and Karras sigmas.

A DDPM process with cumulative ``abar_k`` (step ``k = 0 .. T-1``) is, in the
variance-exploding view, ``x_k / sqrt(abar_k) = x_start + sigma_k eps`` with

    sigma_k = sqrt((1 - abar_k) / abar_k),       alpha = 1 / sqrt(1 + sigma^2),  sigma_vp = sigma alpha,

and the solvers step through a decreasing grid ``sigma_0 > ... > sigma_{n-1} > sigma_n``
(``sigma_n = 0`` or the table's smallest sigma) while the model is called at the
(possibly fractional) step ``s_i`` of ``sigma_i``. The grids are diffusers' (0.42):

* multistep layout (DPM-Solver++, UniPC): integer steps,
  ``linspace``: ``round(linspace(0, T-1, n+1))`` reversed, the last dropped;
  ``leading``: ``arange(n+1) * (T // (n+1))`` reversed, the last dropped, plus ``steps_offset``;
  ``trailing``: ``round(arange(T, 0, -T/n)) - 1``;
* euler layout (Euler, Heun, Euler ancestral): ``linspace``: ``linspace(0, T-1, n)`` reversed
  (fractional); ``leading``: ``arange(n) * (T // n)`` reversed, plus ``steps_offset``; ``trailing`` as above;
* ``karras = True`` (Karras et al. 2022, eq. 5, ``rho = 7``): ``sigma_i = (smax^(1/rho) + i/(n-1)
  (smin^(1/rho) - smax^(1/rho)))^rho`` between the table's extreme sigmas, the step of each
  sigma by log-linear interpolation of the table (`sigma_to_step`), rounded in the multistep layout.

Off the integer steps ``sigma`` is interpolated linearly in the step (``np.interp``).
Everything is float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

SPACINGS = ("leading", "trailing", "linspace")
LAYOUTS = ("multistep", "euler")
FINAL_SIGMAS = ("zero", "sigma_min")
#: diffusers' floor for abar at the zero-SNR terminal step (keeps sigma finite)
ZERO_SNR_ABAR = 2.0 ** -24


def train_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """``sigma_k = sqrt((1 - abar_k) / abar_k)`` of every training step, float64 ``(T,)``."""
    abar = alphas_cumprod.to(torch.float64).clamp_min(ZERO_SNR_ABAR)
    return ((1.0 - abar) / abar).sqrt()


def spaced_steps(num_train: int, n: int, spacing: str, layout: str = "multistep", steps_offset: int = 0) -> Tensor:
    """The ``n`` (possibly fractional) training steps a solver visits, decreasing, float64 ``(n,)``."""
    if spacing not in SPACINGS or layout not in LAYOUTS:
        raise ValueError(f"unknown spacing {spacing!r} / layout {layout!r}; expected {SPACINGS} / {LAYOUTS}")
    if spacing == "trailing":
        ratio = num_train / n
        grid = torch.tensor([float(round(num_train - i * ratio)) - 1.0 for i in range(n)], dtype=torch.float64)
    elif layout == "multistep":
        if spacing == "linspace":
            grid = torch.linspace(0, num_train - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
        else:
            grid = (torch.arange(n + 1, dtype=torch.float64) * (num_train // (n + 1))).flip(0)[:-1] + steps_offset
    elif spacing == "linspace":
        grid = torch.linspace(0, num_train - 1, n, dtype=torch.float64).flip(0)
    else:
        grid = (torch.arange(n, dtype=torch.float64) * (num_train // n)).flip(0) + steps_offset
    return grid


def interp_sigma(steps: Tensor, sigmas: Tensor) -> Tensor:
    """``sigma`` at fractional steps by linear interpolation of the table ``sigmas (T,)`` (``np.interp``)."""
    steps = steps.to(torch.float64).clamp(0, sigmas.shape[0] - 1)
    low = steps.floor().long().clamp(max=sigmas.shape[0] - 2)
    w = steps - low
    return (1.0 - w) * sigmas[low] + w * sigmas[low + 1]


def sigma_to_step(sigma: Tensor, sigmas: Tensor) -> Tensor:
    """The fractional step of each ``sigma``: linear in ``log sigma`` between the neighbouring table entries."""
    log_table = sigmas.log()
    log_sigma = sigma.to(torch.float64).clamp_min(1e-10).log()
    low = (log_sigma[None, :] >= log_table[:, None]).long().cumsum(0).argmax(0).clamp(max=sigmas.shape[0] - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1.0 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al.'s ``n`` sigmas from `sigma_max` down to `sigma_min`, float64 ``(n,)``."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_grid(alphas_cumprod: Tensor, n: int, spacing: str = "leading", *, layout: str = "multistep",
               karras: bool = False, final_sigma: str = "zero", steps_offset: int = 0) -> tuple[Tensor, Tensor]:
    """(steps ``(n,)``, sigmas ``(n+1,)``) of a solver grid over a process with cumulative `alphas_cumprod`.

    ``sigmas[n]`` is 0 (``final_sigma = "zero"``) or the table's smallest sigma (``"sigma_min"``).
    """
    if final_sigma not in FINAL_SIGMAS:
        raise ValueError(f"unknown final_sigma {final_sigma!r}; expected one of {FINAL_SIGMAS}")
    table = train_sigmas(alphas_cumprod)
    if karras:
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
        steps = sigma_to_step(sigmas, table)
        steps = steps.round() if layout == "multistep" else steps
    else:
        steps = spaced_steps(table.shape[0], n, spacing, layout, steps_offset)
        sigmas = interp_sigma(steps, table)
    last = torch.zeros(1, dtype=torch.float64) if final_sigma == "zero" else table[:1]
    return steps, torch.cat([sigmas, last])


def vp_coefficients(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha, sigma_vp, lambda)`` of VE sigmas: ``alpha = 1/sqrt(1+s^2)``, ``sigma_vp = s alpha``,
    ``lambda = log(alpha / sigma_vp) = -log s`` (``+inf`` at ``s = 0``)."""
    alpha = 1.0 / torch.sqrt(1.0 + sigma ** 2)
    return alpha, sigma * alpha, -torch.log(sigma)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale ``sqrt(abar)`` so that ``abar_{T-1} = 0`` and
    ``abar_0`` is unchanged; returns the new betas, float64 ``(T,)``."""
    root = torch.cumprod(1.0 - betas.to(torch.float64), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


__all__ = ["SPACINGS", "LAYOUTS", "FINAL_SIGMAS", "train_sigmas", "spaced_steps", "interp_sigma", "sigma_to_step",
           "karras_sigmas", "sigma_grid", "vp_coefficients", "rescale_zero_terminal_snr"]
