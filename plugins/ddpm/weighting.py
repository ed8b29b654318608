"""Training tricks of the ``ddpm`` objective: SNR loss weights and perturbed noise.

**Loss weights** (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy"). With ``SNR_k = abar_k / (1 - abar_k)`` the three regression targets are
one loss in three scalings at fixed ``(x_k, k)``:

    |eps - eps_hat|^2 = SNR |x0 - x0_hat|^2,     |v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2.

A weighting is a weight ``w(SNR)`` on the x_start error; the weight on the
model's own mean-squared error is ``w / SNR`` (epsilon), ``w`` (x_start) or
``w / (SNR + 1)`` (v):

* ``min_snr``: ``w = min(SNR, gamma)`` (epsilon: ``min(SNR, gamma) / SNR``);
* ``snr``: ``w = SNR`` (the plain epsilon loss, expressed for any target);
* ``none``: weight 1 on the model's own error (guided-diffusion's default).

**Noise** (per example, through `core.rng`, so independent of the process count):

* offset noise (Guttenberg 2023): ``noise <- noise + offset * n``, ``n ~ N(0, I)`` of shape
  ``(B, C, 1, ..., 1)`` broadcast over the spatial dimensions; the target uses this noise;
* input perturbation (Ning et al. 2023): ``x_k`` is built from ``noise + gamma * n'``
  (``n' ~ N(0, I)`` shaped like the data) while the target keeps ``noise``.

Offset noise is added first, then the perturbation (the order of diffusers'
``train_text_to_image.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core import rng

from .diffusion import GaussianDiffusion

WEIGHTINGS = ("none", "snr", "min_snr")


def snr(diffusion: GaussianDiffusion, k: Tensor) -> Tensor:
    """``SNR_k = abar_k / (1 - abar_k)`` at steps ``k (B,)``, float64 ``(B,)`` (0 at a zero-SNR terminal step)."""
    abar = diffusion.tables["alphas_cumprod"][k.cpu()].to(k.device)
    return abar / (1.0 - abar)


def loss_weights(snr_k: Tensor, prediction: str, weighting: str, gamma: float = 5.0) -> Tensor:
    """Per-example weights ``(B,)`` on the mean-squared error of a `prediction` model (see the module docstring).

    Args:
        snr_k: ``(B,)`` signal-to-noise ratios (float64 for exact weights).
        prediction: "epsilon", "x_start" or "v".
        weighting: "none", "snr" or "min_snr".
        gamma: the clamp of min_snr.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        return torch.ones_like(snr_k)
    w = snr_k.clamp(max=gamma) if weighting == "min_snr" else snr_k
    if prediction == "epsilon":
        return w / snr_k
    if prediction == "v":
        return w / (snr_k + 1.0)
    return w


def perturbed_noise(noise: Tensor, draw: rng.ExampleRandom, offset: float = 0.0,
                    perturbation: float = 0.0) -> tuple[Tensor, Tensor]:
    """(noise that builds ``x_k``, noise the target uses), both shaped like ``noise (B, C, ...)``.

    Draws nothing for ``offset = perturbation = 0`` (streams ``offset_noise`` and ``input_perturbation``).
    """
    if offset:
        per_channel = (noise.shape[1],) + (1,) * (noise.ndim - 2) if noise.ndim > 1 else ()
        noise = noise + offset * draw.randn(per_channel, "offset_noise", device=noise.device, dtype=noise.dtype)
    if perturbation:
        return noise + perturbation * draw.randn_like(noise, "input_perturbation"), noise
    return noise, noise
