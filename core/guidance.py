"""Classifier-free guidance, shared by every generative plugin.

With guidance scale ``w`` the guided prediction is

    f_w(x, t, y) = (1 + w) * f(x, t, y) - w * f(x, t, null)

so ``w = 0`` is the conditional model, and ``null = num_classes`` is the label
the model was trained on when the label was dropped. The conditional and
unconditional halves are evaluated as one batch of ``2B``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassifierFreeGuidance(nn.Module):
    """Wraps ``model(x, t, y)`` into its guided version (same call signature and output shape)."""

    def __init__(self, model: nn.Module, scale: float, null_label: int):
        super().__init__()
        self.model, self.scale, self.null_label = model, float(scale), int(null_label)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None or self.scale == 0.0:
            return self.model(x, t, y)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_label)]))
        cond, uncond = both.chunk(2)
        return (1.0 + self.scale) * cond - self.scale * uncond


def guided(model: nn.Module, scale: float, num_classes: int) -> nn.Module:
    """`model` itself when no guidance applies, else its `ClassifierFreeGuidance` wrapper."""
    if scale == 0.0 or num_classes <= 0:
        return model
    return ClassifierFreeGuidance(model, scale, num_classes)
