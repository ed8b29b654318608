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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step toward `model`'s current weights."""
        params = [p for p in model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(self._ema_params, [p.detach() for p in params], 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
