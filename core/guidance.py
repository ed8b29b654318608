"""Classifier-free guidance, shared by every generative plugin.

With guidance scale ``w`` the guided prediction is

    f_w(x, t, y) = (1 + w) * f(x, t, y) - w * f(x, t, null)

so ``w = 0`` is the conditional model, and ``null = num_classes`` is the label
the model was trained on when the label was dropped. The conditional and
unconditional halves are evaluated as one batch of ``2B``.

Two options refine it (`guide`), set by the objectives' ``guidance_interval`` and
``guidance_rescale`` through `configured`:

* guidance interval (Kynkaanniemi et al. 2024): ``f_w`` only for examples with
  ``lo <= t <= hi``; elsewhere the conditional ``f(x, t, y)`` (no unconditional
  evaluation when no example of the batch is inside);
* CFG rescale (Lin et al. 2024, eq. 15-16): ``f_r = f_w std(f_c) / std(f_w)`` with
  the standard deviations over every dimension but the batch, then
  ``phi f_r + (1 - phi) f_w``; applied to the model's own output (as diffusers'
  ``rescale_noise_cfg``).

Training the unconditional model: `drop_labels` replaces each label by the
null label with probability ``p`` (the label dropout of every objective),
drawing per example through `core.rng` so the choice does not depend on the
process count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from registry import ConfigError

from . import rng


def guide(cond: Tensor, uncond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """``(1 + w) cond - w uncond`` (``(B, ...)``), CFG-rescaled by ``phi = rescale`` (module docstring)."""
    guided = (1.0 + scale) * cond - scale * uncond
    if rescale:
        dims = tuple(range(1, cond.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = rescale * (guided * ratio) + (1.0 - rescale) * guided
    return guided


def check_options(interval: Sequence[float], rescale: float) -> None:
    """ConfigError unless ``0 <= lo <= hi <= 1`` and ``0 <= rescale <= 1``."""
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ConfigError(f"expected [lo, hi] with 0 <= lo <= hi <= 1, got {list(interval)!r}", ("guidance_interval",))
    if not 0.0 <= rescale <= 1.0:
        raise ConfigError(f"expected phi in [0, 1], got {rescale!r}", ("guidance_rescale",))


class ClassifierFreeGuidance(nn.Module):
    """Wraps ``model(x, t, y)`` into its guided version (same call signature and output shape)."""

    def __init__(self, model: nn.Module, scale: float, null_label: int, interval: Sequence[float] = (0.0, 1.0),
                 rescale: float = 0.0):
        super().__init__()
        self.model, self.scale, self.null_label = model, float(scale), int(null_label)
        self.interval, self.rescale = (float(interval[0]), float(interval[1])), float(rescale)

    def combine(self, cond: Tensor, uncond: Tensor) -> Tensor:
        """The guided output from the conditional and unconditional outputs (subclasses pick channels)."""
        return guide(cond, uncond, self.scale, self.rescale)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None or self.scale == 0.0:
            return self.model(x, t, y)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        inside = None
        if self.interval != (0.0, 1.0):
            inside = (t >= self.interval[0]) & (t <= self.interval[1])
            if not bool(inside.any()):
                return self.model(x, t, y)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_label)]))
        cond, uncond = both.chunk(2)
        out = self.combine(cond, uncond)
        if inside is None:
            return out
        return torch.where(inside.reshape(-1, *([1] * (out.ndim - 1))), out, cond)


def configured(field: nn.Module, interval: Sequence[float] = (0.0, 1.0), rescale: float = 0.0,
               cls: type[ClassifierFreeGuidance] | None = None) -> nn.Module:
    """`field` itself unless it is a `ClassifierFreeGuidance`; then the same guidance (class `cls`, default its
    own) with this `interval` and `rescale`."""
    if not isinstance(field, ClassifierFreeGuidance):
        return field
    return (cls or type(field))(field.model, field.scale, field.null_label, interval, rescale)


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
