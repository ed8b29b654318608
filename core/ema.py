"""Exponential moving average of model weights.

After each optimizer step: ``ema <- decay * ema + (1 - decay) * theta`` for
every floating-point parameter (a single fused ``_foreach_lerp_``); buffers
(e.g. BatchNorm statistics) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An EMA copy of `model` with the given `decay` in [0, 1)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params = [p for p in self.model.parameters() if p.dtype.is_floating_point]
        self._has_buffers = any(True for _ in self.model.buffers())
        self._source: tuple[nn.Module, list[nn.Parameter]] | None = None  # (model, its float parameters)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step toward `model`'s current weights.

        The source's parameter objects are gathered once per model (an optimizer holds on to the same
        objects; ``module.to`` and ``load_state_dict`` keep them); buffers are re-read every call, since a
        module may rebind them.
        """
        if self._source is None or self._source[0] is not model:
            self._source = (model, [p for p in model.parameters() if p.dtype.is_floating_point])
        torch._foreach_lerp_(self._ema_params, self._source[1], 1.0 - self.decay)
        if self._has_buffers:
            for b_ema, b in zip(self.model.buffers(), model.buffers()):
                b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
