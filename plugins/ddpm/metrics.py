"""The ``ddpm_bpd`` metric: the variational bound in bits per dimension (guided-diffusion's ``calc_bpd_loop``).

For held-out data ``x_start`` (continuous, in [-1, 1]) and every step
``k = T-1 .. 0`` it draws ``x_k ~ q(x_k | x_start)`` and adds the bound term
``KL(q(x_{k-1} | x_k, x_start) || p(x_{k-1} | x_k))`` (``k > 0``) or the
discretized Gaussian decoder NLL of ``x_start`` (``k = 0``, ``bins`` levels),
plus the prior term ``KL(q(x_{T-1} | x_start) || N(0, I))``; all in bits per
dimension, averaged over ``num_examples`` held-out examples.

Metric factories see only the data, not the experiment's [path], so the
metric takes the process's four options itself (the same names and defaults
as the gaussian_diffusion path); an experiment file repeats the path's values.

Reported (keys prefixed with the metric's name in summary.json):
``total`` (the bound), ``prior``, ``decoder`` (the step-0 term), ``mse`` (of
the implied epsilon, mean over steps) and ``xstart_mse`` (mean over steps).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from core.interfaces import DataSource, DataSpec
from registry import ConfigError

from .path import DiffusionConfig


@attrs.define
class BpdConfig(DiffusionConfig):
    """Options of the ddpm_bpd metric.

    Attributes:
        schedule: as the gaussian_diffusion path: "linear" or "cosine".
        steps: as the path: number of diffusion steps T.
        prediction: as the path: "epsilon", "x_start" or "v".
        variance: as the path: "fixed_large", "fixed_small", "learned_range" or "learned".
        respacing: evaluate the bound of a respaced process ("" = every step; as the solvers' option).
        num_examples: held-out examples to evaluate.
        batch_size: examples per model call.
        clip_denoised: clamp the predicted x_start to [-1, 1] (guided-diffusion's image_nll default).
        bins: number of quantisation levels of the data in [-1, 1] for the decoder term.
    """

    respacing: str = ""
    num_examples: int = 256
    batch_size: int = 256
    clip_denoised: bool = True
    bins: int = 256

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key in ("num_examples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))
        if self.bins < 2:
            raise ConfigError(f"expected at least 2 bins, got {self.bins}", ("bins",))


class BitsPerDim:
    """A `core.interfaces.ModelMetric`: ``evaluate(model, data, generator) -> {"total": bpd, ...}``."""

    higher_is_better = False

    def __init__(self, config: BpdConfig):
        self.config = config
        try:
            self.diffusion = config.diffusion().respaced(config.respacing)
        except ValueError as exc:
            raise ConfigError(str(exc), ("respacing",)) from None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator) -> dict[str, float]:
        c, d = self.config, self.diffusion
        device = next(iter(model.parameters()), torch.empty(0)).device
        batch = data.reference(c.num_examples, generator)
        was_training = model.training
        model.eval()
        sums = {"total": 0.0, "prior": 0.0, "decoder": 0.0, "mse": 0.0, "xstart_mse": 0.0}
        n = batch["x"].shape[0]
        for start in range(0, n, c.batch_size):
            x = batch["x"][start:start + c.batch_size].to(device)
            y = batch["y"][start:start + c.batch_size].to(device) if "y" in batch else None
            out = d.calc_bpd_loop(lambda x_t, k, y=y: model(x_t, d.model_time(k, x_t), y), x,
                                  clip_denoised=c.clip_denoised, generator=generator, bins=c.bins)
            sums["total"] += out["total_bpd"].sum().item()
            sums["prior"] += out["prior_bpd"].sum().item()
            sums["decoder"] += out["vb"][:, 0].sum().item()
            sums["mse"] += out["mse"].mean(dim=1).sum().item()
            sums["xstart_mse"] += out["xstart_mse"].mean(dim=1).sum().item()
        model.train(was_training)
        return {k: v / n for k, v in sums.items()}


def make_bpd(config: BpdConfig, spec: DataSpec) -> BitsPerDim:
    """Metric factory for ``plugin = "ddpm_bpd"``: continuous data only."""
    if spec.kind != "continuous":
        raise ConfigError(f"ddpm_bpd needs continuous data in [-1, 1], got {spec.kind!r} data")
    return BitsPerDim(config)
