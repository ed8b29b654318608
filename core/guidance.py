"""Classifier-free guidance, shared by every generative plugin.

With guidance scale ``w`` the guided prediction is

    f_w(x, t, y) = (1 + w) * f(x, t, y) - w * f(x, t, null)

so ``w = 0`` is the conditional model, and ``null = num_classes`` is the label
the model was trained on when the label was dropped. The conditional and
unconditional halves are evaluated as one batch of ``2B``.

Training the unconditional model: `drop_labels` replaces each label by the
null label with probability ``p`` (the label dropout of every objective),
drawing per example through `core.rng` so the choice does not depend on the
process count.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import rng


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
        return self.combine(cond, uncond)

    def combine(self, cond: Tensor, uncond: Tensor) -> Tensor:
        """``(1 + w) cond - w uncond`` of the conditional and unconditional outputs ``(B, ...)``."""
        return (1.0 + self.scale) * cond - self.scale * uncond


def guided(model: nn.Module, scale: float, num_classes: int) -> nn.Module:
    """`model` itself when no guidance applies, else its `ClassifierFreeGuidance` wrapper."""
    if scale == 0.0 or num_classes <= 0:
        return model
    return ClassifierFreeGuidance(model, scale, num_classes)


def drop_labels(y: Tensor, p: float, null_label: int, draw: rng.ExampleRandom | None = None,
                stream: str = "label_dropout") -> Tensor:
    """``y (B,)`` with each label replaced by `null_label` with probability `p`.

    `draw` is the batch's `core.rng.for_batch` (per-example draws, stream `stream`); without it
    the draw comes from torch's global RNG. ``p <= 0`` returns `y` unchanged and draws nothing.
    """
    if p <= 0:
        return y
    draw = draw if draw is not None else rng.GlobalRandom(y.shape[0])
    drop = draw.rand(y.shape[1:], stream, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)
