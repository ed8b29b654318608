"""The ``noisy_classifier`` objective: guided-diffusion's classifier training (``scripts/classifier_train.py``)
on the experiment's own ``gaussian_diffusion`` process, for classifier guidance.

Per (micro-)batch of labelled data ``x_start (B, ...)``, ``y (B,)``:

1. draw steps ``k ~ U{0, ..., T-1}`` (the uniform schedule sampler, ``--noised True``) and the noise
   ``eps ~ N(0, I)`` through ``path.sample_source`` (per example, `core.rng`);
2. ``x_k = q_sample(x_start, k, eps) = sqrt(abar_k) x_start + sqrt(1 - abar_k) eps``;
3. ``logits = model(x_k, t_k) (B, K)`` with ``t_k = 1 - (k + 1) / T`` (the model never sees ``y``);
4. ``loss = mean cross_entropy(logits, y)``.

Logged: ``accuracy`` (top-1 of the batch over its drawn steps, guided-diffusion's ``train_acc@1``); the
``noisy_accuracy`` metric gives the held-out accuracy per noise level.

The backbone must output ``(B, num_classes)`` logits: ``unet_classifier`` (guided-diffusion's encoder UNet
with attention pooling) or ``mlp`` with ``classifier = true``. A ``ddpm`` experiment then guides its sampler
with the trained run: ``[objective] classifier = "RUN_DIR"`` (`plugins.ddpm.classifier_guidance`); the
``noisy_accuracy`` metric reports held-out accuracy at chosen noise levels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from core import rng
from core.interfaces import Batch, DataSpec, Objective
from registry import ConfigError

from .path import diffusion_of
from .resample import create_schedule_sampler


@attrs.define
class NoisyClassifierConfig:
    """Options of the noisy_classifier objective: none (the process is the [path]'s, the steps uniform)."""


class NoisyClassifierObjective(Objective):
    """See the module docstring."""

    prediction = None

    def __init__(self, config: NoisyClassifierConfig, spec: DataSpec, path: Any = None):
        if spec.num_classes < 1:
            raise ConfigError("the noisy_classifier objective needs labelled data ([data] conditional = true)")
        self.config, self.spec, self.path = config, spec, path
        self.diffusion = diffusion_of(path, "the noisy_classifier objective")
        self.sampler = create_schedule_sampler("uniform", self.diffusion.num_timesteps)

    def loss(self, models: Mapping[str, nn.Module], batch: Batch, step: int) -> tuple[Tensor, dict[str, Any]]:
        d, x_start, y = self.diffusion, batch["x"], batch["y"]
        draw = rng.for_batch(batch)
        k, _ = self.sampler.sample(x_start.shape[0], x_start.device, draw=draw)
        noise = self.path.sample_source(x_start.shape, device=x_start.device, dtype=x_start.dtype, draw=draw)
        x_t = d.q_sample(x_start, k, noise)
        logits = models["model"](x_t, d.model_time(k, x_t)).float()
        if logits.shape != (x_start.shape[0], self.spec.num_classes):
            raise ConfigError(f"the noisy_classifier objective needs a backbone that outputs (B, num_classes) = "
                              f"{(x_start.shape[0], self.spec.num_classes)} logits, got {tuple(logits.shape)} "
                              f"(use unet_classifier, or mlp with classifier = true)")
        accuracy = (logits.argmax(dim=-1) == y).float().mean().detach()
        return F.cross_entropy(logits, y), {"accuracy": accuracy}


def make_noisy_classifier(config: NoisyClassifierConfig, spec: DataSpec, path: Any = None) -> NoisyClassifierObjective:
    """Objective factory for ``plugin = "noisy_classifier"`` (needs the gaussian_diffusion path)."""
    return NoisyClassifierObjective(config, spec, path)
