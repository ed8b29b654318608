"""Classifier guidance (Dhariwal and Nichol 2021, guided-diffusion's ``condition_score``) as a model wrapper.

A classifier ``c(x_t, t) -> logits (B, K)`` of noisy states gives ``g = grad_x log p(y | x_t)``; Bayes'
rule ``grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t)`` with the score ``-eps / sigma_vp``
turns the model's epsilon into

    eps' = eps - s * sigma_vp * g          (s: the classifier scale; s = 1 is the exact conditional),

which every solver then uses (DDIM, DPM-Solver++, ...; guided-diffusion's ``condition_mean`` for the
ancestral sampler is the same shift of the mean to first order). Other predictions are shifted by
the same ``eps'`` at fixed ``x_t``: ``x0' = x0 + s sigma_vp^2 g / alpha``, ``v' = v - s sigma_vp g / alpha``;
learned variance channels are left alone. The noise level at time ``t`` is the process's at the
(fractional) step ``(1 - t) T - 1``, linear in the step between entries (as the solvers' grids).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .diffusion import GaussianDiffusion
from .spacing import interp_sigma, train_sigmas


class ClassifierGuidance(nn.Module):
    """``model(x, t, y)`` guided by ``classifier(x, t) -> (B, K)`` logits with scale `scale` (same output shape)."""

    def __init__(self, model: nn.Module, classifier: nn.Module, diffusion: GaussianDiffusion, scale: float = 1.0):
        super().__init__()
        self.model, self.classifier, self.diffusion, self.scale = model, classifier, diffusion, float(scale)
        self.table = train_sigmas(diffusion.tables["alphas_cumprod"])

    def gradient(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """``grad_x log p(y | x_t)``, shaped like ``x``."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = self.classifier(x_in, t)
            log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            picked = log_p[torch.arange(x.shape[0], device=x.device), y].sum()
            return torch.autograd.grad(picked, x_in)[0].to(x.dtype)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.model(x, t, y)
        if y is None or self.scale == 0.0:
            return out
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        step = (1.0 - t.to(torch.float64).cpu()) * self.diffusion.original_steps - 1.0
        s = interp_sigma(step, self.table).to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        alpha, sigma_vp = torch.rsqrt(1.0 + s ** 2), s * torch.rsqrt(1.0 + s ** 2)
        shift = self.scale * sigma_vp * self.gradient(x, t, y)  # eps' = eps - shift
        mean, rest = self.diffusion.split_output(out, x)
        prediction = self.diffusion.prediction
        if prediction == "epsilon":
            mean = mean - shift
        elif prediction == "x_start":
            mean = mean + sigma_vp * shift / alpha
        else:
            mean = mean - shift / alpha
        return mean if rest is None else torch.cat([mean, rest], dim=1)
