"""Optimizer parameter groups: weight-decay exclusion and module-declared group options.

``param_groups(model, weight_decay, no_decay_ndim, no_decay_patterns)`` splits the
trainable parameters of `model` into AdamW groups::

    decay     = {p : p.ndim >= no_decay_ndim and no pattern matches its name}   weight_decay
    no_decay  = the other trainable parameters                                  weight decay 0

``no_decay_ndim = 2`` excludes every gain, bias and scalar (``p.ndim < 2``: LayerNorm
weights and biases, linear biases, CLIP's ``logit_scale``), as open_clip's and
TinyCLIP's ``exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or
"logit_scale" in n`` does; patterns are regular expressions searched in the
parameter's qualified name (``re.search``), e.g. ``["bias", "(^|\\.)ln", "logit_scale"]``.

A module may also declare groups of its own with a method
``optimizer_groups() -> list[tuple[str, dict]]``: each ``(regex, options)`` takes the
parameters whose names match the regex (first match wins, before the decay split)
into one group with those AdamW options; ``options["lr"]`` makes the group's learning
rate fixed (the trainer's schedule leaves it alone: `scheduled_lr`). TinyCLIP's L0
masks use this for their constant learning rate without weight decay.

The learning rate of optimizer step ``s`` is ``scaled_lr(cfg) * lr_factor(s, cfg)``: the
factor is linear warmup ``(s + 1) / warmup_steps`` and then constant, cosine
``m + (1 - m)(1 + cos(pi p)) / 2`` or linear ``m + (1 - m)(1 - p)`` decay over
``p = (s - warmup) / (steps - warmup)`` with ``m = min_lr_ratio``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

FIXED_LR = "fixed_lr"


def _declared(model: nn.Module) -> list[tuple[re.Pattern, dict[str, Any]]]:
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    declare = getattr(inner, "optimizer_groups", None)
    return [(re.compile(rx), dict(opts)) for rx, opts in (declare() if callable(declare) else [])]


def param_groups(model: nn.Module, weight_decay: float, no_decay_ndim: int = 0,
                 no_decay_patterns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """AdamW parameter groups of `model`'s trainable parameters (see the module docstring).

    Empty groups are dropped; with no exclusion and no declared group the result is one
    group holding every trainable parameter with ``weight_decay``.
    """
    patterns = [re.compile(p) for p in no_decay_patterns]
    declared = _declared(model)
    special: list[list] = [[] for _ in declared]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = name.removeprefix("module.").removeprefix("_orig_mod.")
        hit = next((i for i, (rx, _) in enumerate(declared) if rx.search(clean)), None)
        if hit is not None:
            special[hit].append(p)
        elif p.ndim < no_decay_ndim or any(rx.search(clean) for rx in patterns):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for (_, opts), params in zip(declared, special):
        group = {"params": params, "weight_decay": float(opts.get("weight_decay", 0.0))}
        if "lr" in opts:
            group["lr"] = group[FIXED_LR] = float(opts["lr"])
        groups.append(group)
    return [g for g in groups if g["params"]]


def scheduled_lr(group: dict[str, Any], lr: float) -> float:
    """The learning rate a group gets this step: its fixed rate if it declared one, else the schedule's `lr`."""
    return group.get(FIXED_LR, lr)


def lr_factor(step: int, cfg: Any, total: int | None = None, warmup: int | None = None) -> float:
    """The learning-rate multiplier at optimizer step `step` (see the module docstring).

    `total` and `warmup` default to ``cfg.steps`` and ``cfg.warmup_steps``.
    """
    total = cfg.steps if total is None else total
    warmup = cfg.warmup_steps if warmup is None else warmup
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    p = min(1.0, max(0.0, (step - warmup) / span))
    m = cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    return m + (1.0 - m) * (1.0 - p)


def scaled_lr(cfg: Any) -> float:
    """``lr`` after the batch-size scaling rule: ``lr * (batch_size / base_batch_size) ** k``, k = 1 (linear), 1/2 (sqrt)."""
    ratio = cfg.batch_size / cfg.base_batch_size
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[cfg.lr_scaling]
