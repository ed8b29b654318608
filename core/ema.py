"""Exponential moving average of model weights.

After each optimizer step: ``ema <- beta * ema + (1 - beta) * theta`` for
every floating-point parameter (a single fused ``_foreach_lerp_``); buffers
(e.g. BatchNorm statistics) are copied. At the ``n``-th update (``n = step + 1``
for the 0-based optimizer step) ``beta`` is, by `warmup`:

* ``"none"``: the constant ``decay``;
* ``"meta"``: ``min(decay, (1 + n) / (10 + n))`` (Meta's flow_matching and
  score_sde's ``ExponentialMovingAverage``, ``use_num_updates``);
* ``"power"``: diffusers' ``EMAModel(use_ema_warmup=True)``: with
  ``m = n - update_after_step - 1``, ``beta = 0`` for ``m <= 0`` (a copy), else
  ``1 - (1 + m / inv_gamma)^(-power)`` clamped to ``[min_decay, decay]``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import attrs
import torch
from torch import nn


WARMUPS = ("none", "meta", "power")


@attrs.frozen
class Warmup:
    """How the EMA rate grows at the start of training (see the module docstring)."""

    rule: Literal["none", "meta", "power"] = "none"
    power: float = 2.0 / 3.0
    inv_gamma: float = 1.0
    min_decay: float = 0.0
    update_after_step: int = 0

    def beta(self, decay: float, n: int) -> float:
        """The rate of the `n`-th update (1-based) for the EMA's `decay`."""
        if self.rule == "none":
            return decay
        if self.rule == "meta":
            return min(decay, (1.0 + n) / (10.0 + n))
        m = n - self.update_after_step - 1
        if m <= 0:
            return 0.0
        return max(min(1.0 - (1.0 + m / self.inv_gamma) ** -self.power, decay), self.min_decay)


def warmup_of(cfg: Any) -> Warmup:
    """The `Warmup` that a `core.config.TrainerConfig`'s ``ema_*`` options describe."""
    return Warmup(cfg.ema_warmup, cfg.ema_power, cfg.ema_inv_gamma, cfg.ema_min_decay, cfg.ema_update_after_step)


class EMA:
    """An EMA copy of `model` with the given `decay` in [0, 1) and `warmup` (default: none)."""

    def __init__(self, model: nn.Module, decay: float, warmup: Warmup | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup or Warmup()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params = [p for p in self.model.parameters() if p.dtype.is_floating_point]
        self._has_buffers = any(True for _ in self.model.buffers())
        self._source: tuple[nn.Module, list[nn.Parameter]] | None = None  # (model, its float parameters)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """Move the average one step toward `model`'s current weights after optimizer step `step` (0-based).

        The source's parameter objects are gathered once per model (an optimizer holds on to the same
        objects; ``module.to`` and ``load_state_dict`` keep them); buffers are re-read every call, since a
        module may rebind them.
        """
        if self._source is None or self._source[0] is not model:
            self._source = (model, [p for p in model.parameters() if p.dtype.is_floating_point])
        torch._foreach_lerp_(self._ema_params, self._source[1], 1.0 - self.warmup.beta(self.decay, step + 1))
        if self._has_buffers:
            for b_ema, b in zip(self.model.buffers(), model.buffers()):
                b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
