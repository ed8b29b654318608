"""Run a diffusers scheduler in float64 end to end (a test helper, not a test module).

diffusers keeps its tables and its step arithmetic in float32 (``torch.float32`` and
``np.float32`` are named in every scheduler module). `float64_scheduler` builds a
scheduler with those two names in its module rebound to float64 for the duration of
construction, ``set_timesteps`` and every ``step``, so a step-for-step comparison is
exact to float64 rounding rather than float32's.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any

import numpy as np
import torch


class _Float64Torch:
    float32 = torch.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _Float64Numpy:
    float32 = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@contextlib.contextmanager
def float64_module(cls: type):
    """Rebind ``torch`` / ``np`` in `cls`'s module (and diffusers' randn_tensor helper) to float64 proxies."""
    modules = [sys.modules[cls.__module__], importlib.import_module("diffusers.utils.torch_utils")]
    saved = [(m, m.__dict__.get("torch"), m.__dict__.get("np")) for m in modules]
    try:
        for m in modules:
            if "torch" in m.__dict__:
                m.torch = _Float64Torch()
            if "np" in m.__dict__:
                m.np = _Float64Numpy()
        yield
    finally:
        for m, t, n in saved:
            if t is not None:
                m.torch = t
            if n is not None:
                m.np = n


class Float64Scheduler:
    """A diffusers scheduler whose every call runs under `float64_module`."""

    def __init__(self, cls: type, **config: Any):
        self.cls = cls
        with float64_module(cls):
            self.inner = cls(**config)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            with float64_module(self.cls):
                return value(*args, **kwargs)

        return call
