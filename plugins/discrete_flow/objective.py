"""Training objectives of discrete flow matching on a discrete path (mixture or metric-induced).

Per (micro-)batch: ``x_1 = batch["x"]`` (token ids ``(B, ...)``), times
``t ~ U[0, t_max]``, ``x_0 ~ p_0`` from the path, ``x_t ~ p_t(. | x_0, x_1)``,
and the model's logits of the posterior ``p_{1|t}(x_1 | x_t)``. Two losses,
per position ``i`` with ``lambda_t = kappa'_t / (1 - kappa_t)`` and
``delta_i = [x_t^i = x_1^i]``:

* ``generalized_kl`` (Gat et al. 2024; Shaul et al. 2024): the Bregman
  divergence between the conditional velocity ``lambda_t (delta_{x_1} - delta_{x_t})``
  and the model's ``lambda_t (p_{1|t} - delta_{x_t})``,

      l_i = lambda_t * (delta_i - p_{1|t}(x_t^i) - (1 - delta_i) log p_{1|t}(x_1^i)),

  which is non-negative, zero exactly when ``p_{1|t}^i`` is the one-hot of
  ``x_1^i``, and whose expectation over ``t ~ U[0, 1]`` summed over positions
  is the negative ELBO of the data (see `plugins.discrete_flow.metrics`).
  ``lambda_t`` diverges at ``t = 1``, hence ``t_max < 1``. On another path
  (``metric_discrete``) the loss is the same divergence between that path's
  conditional and model velocities, which the path computes
  (`DiscretePath.generalized_kl`).
* ``cross_entropy``: ``l_i = -log p_{1|t}(x_1^i | x_t)`` (no time weighting).

The loss is the mean of ``l_i`` over the batch's positions. Conditioning:

* ``batch["y"]`` (class labels) are passed to the model, each replaced by
  the null label ``num_classes`` with probability ``label_dropout`` (trains
  the unconditional model that classifier-free guidance needs).
* ``batch["known"]`` (optional BoolTensor shaped like ``x``) marks given
  positions: they hold their data token in ``x_t`` at every ``t`` and are left
  out of the loss — the same convention the discrete Euler solver's
  ``known`` argument uses at sampling time.

Logged: the other loss (``ce`` when training the generalized KL, ``gkl`` otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs
import torch
from torch import Tensor, nn

from core import rng
from core.guidance import drop_labels
from core.interfaces import Batch, DataSpec, Objective, Path
from core.nn import append_dims
from registry import ConfigError

from .path import DiscretePath, generalized_kl  # noqa: F401  (generalized_kl: the mixture closed form)


@attrs.define
class DiscreteFMConfig:
    """Options of the discrete_fm objective.

    Attributes:
        loss: "generalized_kl" (the mixture path's ELBO integrand) or "cross_entropy".
        t_max: times are drawn uniformly in [0, t_max]; below 1 because the
            generalized KL weight kappa'/(1 - kappa) diverges at t = 1.
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
    """

    loss: Literal["generalized_kl", "cross_entropy"] = "generalized_kl"
    t_max: float = 0.999
    label_dropout: float = 0.0

    def __attrs_post_init__(self) -> None:
        if not 0.0 < self.t_max <= 1.0:
            raise ConfigError(f"expected a number in (0, 1], got {self.t_max!r}", ("t_max",))
        if self.loss == "generalized_kl" and self.t_max >= 1.0:
            raise ConfigError("the generalized KL weight diverges at t = 1: expected t_max < 1 (e.g. 0.999)",
                              ("t_max",))
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ConfigError(f"expected a probability, got {self.label_dropout!r}", ("label_dropout",))


class DiscreteFlowMatching(Objective):
    """See the module docstring."""

    #: the model outputs logits of the posterior ``p(x_1 | x_t)`` ``(B, ..., V)``
    prediction = "x1"

    def __init__(self, config: DiscreteFMConfig, spec: DataSpec, path: Path | None = None):
        if not isinstance(path, DiscretePath):
            raise ConfigError("discrete_fm needs a discrete [path] section: plugin = \"mixture_discrete\" or "
                              "\"metric_discrete\"", ("plugin",))
        self.config, self.spec, self.path = config, spec, path

    def loss(self, models: Mapping[str, nn.Module], batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        x_1 = batch["x"]
        draw = rng.for_batch(batch)
        t = draw.rand((), "time", device=x_1.device) * self.config.t_max
        x_0 = self.path.sample_source(x_1.shape, device=x_1.device, draw=draw)
        x_t = self.path.sample(x_0, x_1, t, draw=draw).x_t
        known = batch.get("known")
        if known is not None:
            x_t = torch.where(known, x_1, x_t)
        y = batch.get("y")
        if y is not None:
            y = drop_labels(y, self.config.label_dropout, self.spec.num_classes, draw)
        log_p = self.path.log_posterior(models["model"](x_t, t, y), x_t, t)
        gkl = self.path.generalized_kl(log_p, x_1, x_t, t)
        ce = -log_p.gather(-1, x_1.unsqueeze(-1)).squeeze(-1)
        if known is not None:
            weight = (~known).to(gkl.dtype)
            count = weight.sum().clamp_min(1.0)
            gkl, ce = (gkl * weight).sum() / count, (ce * weight).sum() / count
        else:
            gkl, ce = gkl.mean(), ce.mean()
        if self.config.loss == "generalized_kl":
            return gkl, {"ce": ce.item()}
        return ce, {"gkl": gkl.item()}


def make_discrete_fm(config: DiscreteFMConfig, spec: DataSpec, path: Path | None = None) -> DiscreteFlowMatching:
    """Objective factory for ``plugin = "discrete_fm"``."""
    return DiscreteFlowMatching(config, spec, path)
