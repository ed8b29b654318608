"""Flow-matching objectives.

``velocity_mse``: draw ``x_0 ~ p_0`` from the path, ``t`` from a time sampler,
``x_t`` and the target velocity from the path, and regress

    L = E_{t, x_0, x_1} || u_theta(x_t, t, y) - (d_alpha_t x_1 + d_sigma_t x_0) ||^2

(the mean over batch and data dimensions). With ``label_dropout = p`` each
label is replaced by the null label ``num_classes`` with probability ``p``,
which trains the unconditional model used by classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs
import torch
from torch import Tensor, nn

from core.interfaces import Batch, DataSpec, Objective, Path
from registry import ConfigError


@attrs.define
class VelocityMSEConfig:
    """Options of the velocity_mse objective.

    Attributes:
        time_sampler: "uniform" (t ~ U[0, 1]) or "logit_normal" (t = sigmoid(n), n ~ N(mean, std^2)).
        mean: mean of the logit-normal sampler.
        std: standard deviation of the logit-normal sampler.
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
    """

    time_sampler: Literal["uniform", "logit_normal"] = "uniform"
    mean: float = 0.0
    std: float = 1.0
    label_dropout: float = 0.0


def sample_times(config: VelocityMSEConfig, n: int, device: torch.device) -> Tensor:
    """``n`` times in [0, 1] from the configured sampler (torch's global RNG)."""
    if config.time_sampler == "uniform":
        return torch.rand(n, device=device)
    return torch.sigmoid(config.mean + config.std * torch.randn(n, device=device))


def drop_labels(y: Tensor, p: float, null_label: int) -> Tensor:
    """Each label replaced by `null_label` with probability `p`."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)


class VelocityMSE(Objective):
    """See the module docstring."""

    def __init__(self, config: VelocityMSEConfig, spec: DataSpec, path: Path | None = None):
        if path is None:
            raise ConfigError("velocity_mse needs a [path] section (e.g. plugin = \"affine\")")
        self.config, self.spec, self.path = config, spec, path

    def loss(self, models: Mapping[str, nn.Module], batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        x_1 = batch["x"]
        x_0 = torch.randn_like(x_1)
        t = sample_times(self.config, x_1.shape[0], x_1.device)
        ps = self.path.sample(x_0, x_1, t)
        y = batch.get("y")
        if y is not None:
            y = drop_labels(y, self.config.label_dropout, self.spec.num_classes)
        pred = models["model"](ps.x_t, t, y)
        return (pred.float() - ps.target.float()).pow(2).mean(), {}
