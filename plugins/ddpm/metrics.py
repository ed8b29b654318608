"""The ``ddpm_bpd`` metric: the variational bound in bits per dimension (guided-diffusion's ``calc_bpd_loop``).

For held-out data ``x_start`` (continuous, in [-1, 1]) and every step
``k = T-1 .. 0`` it draws ``x_k ~ q(x_k | x_start)`` and adds the bound term
``KL(q(x_{k-1} | x_k, x_start) || p(x_{k-1} | x_k))`` (``k > 0``) or the
discretized Gaussian decoder NLL of ``x_start`` (``k = 0``, ``bins`` levels),
plus the prior term ``KL(q(x_{T-1} | x_start) || N(0, I))``; all in bits per
dimension, averaged over ``num_examples`` held-out examples.

Inside a run the metric is the bound of the run's own process: the factory
receives the experiment's [path] (gaussian_diffusion) and uses its schedule,
steps, prediction and variance. Those four options stay unset in an experiment
file; a value given that contradicts the run's path is a configuration error,
and a run whose path is not gaussian_diffusion is refused. Outside a run (no
path), they describe the process, with the path's defaults.

Reported (keys prefixed with the metric's name in summary.json):
``total`` (the bound), ``prior``, ``decoder`` (the step-0 term), ``mse`` (of
the implied epsilon, mean over steps) and ``xstart_mse`` (mean over steps).

The ``noisy_accuracy`` metric (`NoisyAccuracy`) is the held-out top-1 accuracy of a noisy classifier
(the ``noisy_classifier`` objective's model) on ``q_sample`` states of the run's process.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import nn

from core.interfaces import DataSource, DataSpec
from registry import ConfigError

from .diffusion import time_to_step
from .path import DiffusionConfig, GaussianDiffusionPath


PROCESS_KEYS = tuple(f.name for f in attrs.fields(DiffusionConfig))


@attrs.define
class BpdConfig:
    """Options of the ddpm_bpd metric.

    Attributes:
        schedule: unset: the run's [path]; outside a run "linear" or "cosine" (default linear).
        steps: unset: the run's [path]; outside a run the number of diffusion steps T (default 1000).
        prediction: unset: the run's [path]; outside a run "epsilon", "x_start" or "v" (default epsilon).
        variance: unset: the run's [path]; outside a run "fixed_large", "fixed_small", "learned_range" or
            "learned" (default fixed_large).
        zero_terminal_snr: unset: the run's [path]; outside a run the path's option (default false).
        respacing: evaluate the bound of a respaced process ("" = every step; as the solvers' option).
        num_examples: held-out examples to evaluate.
        batch_size: examples per model call.
        clip_denoised: clamp the predicted x_start to [-1, 1] (guided-diffusion's image_nll default).
        bins: number of quantisation levels of the data in [-1, 1] for the decoder term.
    """

    schedule: Literal["linear", "cosine"] | None = None
    steps: int | None = None
    prediction: Literal["epsilon", "x_start", "v"] | None = None
    variance: Literal["fixed_small", "fixed_large", "learned", "learned_range"] | None = None
    zero_terminal_snr: bool | None = None
    respacing: str = ""
    num_examples: int = 256
    batch_size: int = 256
    clip_denoised: bool = True
    bins: int = 256

    def __attrs_post_init__(self) -> None:
        DiffusionConfig(**self.given())  # validates the process options that are given
        for key in ("num_examples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))
        if self.bins < 2:
            raise ConfigError(f"expected at least 2 bins, got {self.bins}", ("bins",))

    def given(self) -> dict[str, Any]:
        """The process options set in the file (the others are the run's, or the path's defaults)."""
        return {k: getattr(self, k) for k in PROCESS_KEYS if getattr(self, k) is not None}


class BitsPerDim:
    """A `core.interfaces.ModelMetric`: ``evaluate(model, data, generator) -> {"total": bpd, ...}``."""

    higher_is_better = False

    def __init__(self, config: BpdConfig, process: DiffusionConfig):
        self.config, self.process = config, process
        try:
            self.diffusion = process.diffusion().respaced(config.respacing)
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


def run_process(config: BpdConfig, path: Any) -> DiffusionConfig:
    """The run's process, refusing a given option that contradicts it."""
    if not isinstance(path, GaussianDiffusionPath):
        raise ConfigError(f"ddpm_bpd is the bound of the gaussian_diffusion process; this run's path is "
                          f"{type(path).__name__} (a flow-matching run reports the likelihood metric)")
    run = path.config.diffusion_options()
    for key, value in config.given().items():
        if value != run[key]:
            raise ConfigError(f"{key} = {value!r}, but this run's [path] has {key} = {run[key]!r}; leave it unset "
                              f"to use the run's", (key,))
    return path.config


def make_ddpm_bpd(config: BpdConfig, spec: DataSpec, path: Any = None) -> BitsPerDim:
    """Metric factory for ``plugin = "ddpm_bpd"``: continuous data only; inside a run, the run's `path`."""
    if spec.kind != "continuous":
        raise ConfigError(f"ddpm_bpd needs continuous data in [-1, 1], got {spec.kind!r} data")
    process = run_process(config, path) if path is not None else DiffusionConfig(**config.given())
    return BitsPerDim(config, process)


@attrs.define
class NoisyAccuracyConfig:
    """Options of the noisy_accuracy metric.

    Attributes:
        times: flowforge times t (1 = data, 0 = pure noise) at which to report the accuracy; each is
            snapped to its diffusion step k = round((1 - t) T) - 1.
        num_examples: held-out examples to evaluate.
        batch_size: examples per classifier call.
    """

    times: list[float] = attrs.Factory(lambda: [0.9, 0.5, 0.1])
    num_examples: int = 256
    batch_size: int = 256

    def __attrs_post_init__(self) -> None:
        if any(not 0.0 <= t <= 1.0 for t in self.times):
            raise ConfigError(f"expected times in [0, 1], got {self.times}", ("times",))
        for key in ("num_examples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))


class NoisyAccuracy:
    """A `core.interfaces.ModelMetric` of a noisy classifier ``model(x_t, t) -> (B, K)``: the top-1 accuracy on
    held-out ``x_k = q_sample(x_start, k, eps)``, ``{"uniform": at k ~ U{0..T-1}, "t=0.9": at that step, ...}``
    (guided-diffusion's ``val_acc@1`` is the uniform one)."""

    higher_is_better = True

    def __init__(self, config: NoisyAccuracyConfig, path: GaussianDiffusionPath):
        self.config, self.diffusion = config, path.diffusion

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator) -> dict[str, float]:
        c, d = self.config, self.diffusion
        device = next(iter(model.parameters()), torch.empty(0)).device
        batch = data.reference(c.num_examples, generator)
        n, was_training = batch["x"].shape[0], model.training
        model.eval()
        levels = {"uniform": None, **{f"t={t:g}": time_to_step(torch.tensor(t), d.num_timesteps) for t in c.times}}
        right = dict.fromkeys(levels, 0.0)
        for start in range(0, n, c.batch_size):
            x, y = (batch[key][start:start + c.batch_size] for key in ("x", "y"))
            for name, step in levels.items():
                k = torch.randint(d.num_timesteps, (x.shape[0],), generator=generator) if step is None \
                    else step.expand(x.shape[0])
                x_t = d.q_sample(x, k, torch.randn(x.shape, generator=generator, dtype=x.dtype))
                logits = model(x_t.to(device), d.model_time(k, x_t).to(device))
                right[name] += (logits.argmax(dim=-1).cpu() == y).sum().item()
        model.train(was_training)
        return {name: v / n for name, v in right.items()}


def make_noisy_accuracy(config: NoisyAccuracyConfig, spec: DataSpec, path: Any = None) -> NoisyAccuracy:
    """Metric factory for ``plugin = "noisy_accuracy"``: labelled data and the run's gaussian_diffusion path."""
    if spec.num_classes < 1:
        raise ConfigError("noisy_accuracy needs labelled data ([data] conditional = true)")
    if not isinstance(path, GaussianDiffusionPath):
        raise ConfigError("noisy_accuracy needs [path] plugin = \"gaussian_diffusion\" (the classifier's process)")
    return NoisyAccuracy(config, path)
