"""Classifier guidance (Dhariwal and Nichol 2021, guided-diffusion's ``condition_score``) as a model wrapper.

A classifier ``c(x_t, t) -> logits (B, K)`` of noisy states gives ``g = grad_x log p(y | x_t)``; Bayes'
rule ``grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t)`` with the score ``-eps / sigma_vp``
turns the model's epsilon into

    eps' = eps - s * sigma_vp * g          (s: the classifier scale; s = 1 is the exact conditional),

which every solver then uses (DDIM, DPM-Solver++, ...: guided-diffusion's ``condition_score``), except
``ddpm_ancestral``: given this wrapper it calls the unguided ``model`` and adds ``s Sigma g`` to the mean
of ``p(x_{k-1} | x_k)`` (guided-diffusion's ``condition_mean``, `plugins.ddpm.solver`). Other predictions are shifted by
the same ``eps'`` at fixed ``x_t``: ``x0' = x0 + s sigma_vp^2 g / alpha``, ``v' = v - s sigma_vp g / alpha``;
learned variance channels are left alone. The noise level at time ``t`` is the process's at the
(fractional) step ``(1 - t) T - 1``, linear in the step between entries (as the solvers' grids).

From an experiment: ``[objective] classifier = "RUN_DIR"`` of the ``ddpm`` objective names a run trained
with the ``noisy_classifier`` objective (`plugins.ddpm.noisy_classifier`) on the same process (schedule,
steps, zero_terminal_snr) and data shape and classes; `load_classifier` loads its EMA weights (its raw
weights when it trained without EMA, as classifier_train.py does) and refuses anything else. ``classifier_scale`` is ``s``; ``classifier_unconditional = true``
calls the diffusion model with the null label (`Unconditional`), so the classifier alone steers to ``y``
(guided-diffusion's unconditional model plus classifier).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.interfaces import DataSpec
from registry import ConfigError

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


class Unconditional(nn.Module):
    """``model(x, t, y)`` called with the null label ``num_classes`` whatever ``y`` (its unconditional branch)."""

    def __init__(self, model: nn.Module, null_label: int):
        super().__init__()
        self.model, self.null_label = model, int(null_label)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model(x, t, torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device))


def load_classifier(run_dir: str, diffusion: GaussianDiffusion, spec: DataSpec) -> nn.Module:
    """The noisy classifier ``(B, ...) , (B,) -> (B, K)`` of the noisy_classifier run in `run_dir`, in eval mode
    on the CPU; ConfigError unless it was trained on this process (same ``abar`` table), data shape and classes."""
    from core.runs import load_experiment, load_run

    where = ("classifier",)
    if not (Path(run_dir) / "config.toml").is_file():
        raise ConfigError(f"{run_dir!r} is not a run directory (no config.toml): train the classifier first, e.g. "
                          f"python -m core.run experiments/ddpm_digits_classifier.toml --out {run_dir}", where)
    decay = load_experiment(run_dir).trainer.ema_decay
    run = load_run(run_dir, ema=bool(decay if not isinstance(decay, list) else decay[0]), device="cpu")
    plugin = run.exp.components["objective"]["plugin"]
    if plugin != "noisy_classifier":
        raise ConfigError(f"{run_dir} was trained with objective {plugin!r}, not noisy_classifier", where)
    mine, theirs = diffusion.tables["alphas_cumprod"], run.components.objective.diffusion.tables["alphas_cumprod"]
    if mine.shape != theirs.shape or not torch.equal(mine, theirs):
        path = run.exp.components["path"]
        raise ConfigError(f"{run_dir} classifies states of another process ([path] schedule = {path['schedule']!r}, "
                          f"steps = {path['steps']}, zero_terminal_snr = {path['zero_terminal_snr']}); train it "
                          f"on this run's [path]", where)
    other: Any = run.components.spec
    if tuple(other.shape) != tuple(spec.shape) or other.num_classes != spec.num_classes:
        raise ConfigError(f"{run_dir} classifies data of shape {tuple(other.shape)} with {other.num_classes} "
                          f"classes; this run has {tuple(spec.shape)} with {spec.num_classes}", where)
    return run.model
