"""Conformance checks for metrics: sample metrics (`SampleMetric`) and model metrics (`ModelMetric`).

::

    from core.testing.metrics import check_sample_metric
    check_sample_metric(registry.build("metric", {"plugin": "mine"}, spec=spec, data=data),
                        samples, name="mine", best_value=0.0)

Sample-metric invariants, each named in the ``AssertionError`` that reports it:

``protocol``
    ``update(samples, real)``, ``compute()``, ``reset()`` and a
    ``higher_is_better`` attribute (True, False or None).
``finite values``
    ``compute()`` returns a finite 0-d tensor (or float), or a dict of them.
``a set against itself is at the best value``
    Comparing a set with itself gives ``best_value`` when one is given (0 for
    a distance); otherwise, when ``higher_is_better`` is set, a value at
    least as good as comparing it with a different set.
``tells different sets apart``
    Comparing with a different set (``other``; by default the samples shifted
    by 1) is strictly worse than comparing the set with itself.
``update accumulates``
    Updating with a set in two halves gives the value of one update.
``reset clears the state``
    After ``reset()`` the metric computes what a fresh one would.

Model-metric invariants: ``evaluate(model, data, generator)`` returns a
dict of finite floats (``finite values``) and the same values for equally
seeded generators (``deterministic given the generator``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .invariants import checking as _checking
from .invariants import require as _require


def _values(value: Any, who: str) -> dict[str, float]:
    """compute()'s result as {key: float}; checks ``finite values``."""
    items = value.items() if isinstance(value, Mapping) else [("value", value)]
    out = {}
    for key, v in items:
        if isinstance(v, Tensor):
            _require(v.numel() == 1, who, "finite values",
                     f"compute() gave a tensor of shape {tuple(v.shape)} for {key!r}")
            v = v.item()
        _require(isinstance(v, (int, float)), who, "finite values", f"compute() gave {type(v).__name__} for {key!r}")
        _require(math.isfinite(float(v)), who, "finite values", f"compute() gave {v} for {key!r}")
        out[str(key)] = float(v)
    return out


def _measure(metric: Any, real: list[Tensor], fake: list[Tensor], who: str, invariant: str) -> dict[str, float]:
    with _checking(who, invariant):
        metric.reset()
        for chunk in real:
            metric.update(chunk, real=True)
        for chunk in fake:
            metric.update(chunk, real=False)
        result = metric.compute()
    return _values(result, who)


def _close(a: dict[str, float], b: dict[str, float], rtol: float, atol: float) -> bool:
    return set(a) == set(b) and all(abs(a[k] - b[k]) <= atol + rtol * abs(b[k]) for k in a)


def check_sample_metric(metric: Any, samples: Tensor, *, name: str | None = None, other: Tensor | None = None,
                        best_value: float | None = None, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Run every sample-metric check (see the module docstring).

    Args:
        metric: the metric.
        samples: a set of examples ``(N, ...)`` (e.g. ``data.reference(N, g)["x"]``), N >= 4.
        other: a set from a different distribution; default ``samples + 1`` (floating data only).
        best_value: the metric's value for identical sets (0 for distances), when it has one.
    """
    who = f"metric {name or type(metric).__name__!r}"
    for attr in ("update", "compute", "reset"):
        _require(callable(getattr(metric, attr, None)), who, "protocol", f"missing method {attr}()")
    _require(hasattr(metric, "higher_is_better"), who, "protocol", "missing attribute higher_is_better")
    hib = metric.higher_is_better
    _require(hib in (True, False, None), who, "protocol", f"higher_is_better is {hib!r}, expected True, False or None")
    if other is None and samples.dtype.is_floating_point:
        other = samples + 1.0

    inv = "a set against itself is at the best value"
    same = _measure(metric, [samples], [samples], who, inv)
    if best_value is not None:
        for key, v in same.items():
            _require(abs(v - best_value) <= atol + rtol * abs(best_value), who, inv,
                     f"{key} = {v!r} for a set against itself, expected {best_value!r}")
    if other is not None:
        diff = _measure(metric, [samples], [other], who, "tells different sets apart")
        if hib is not None:
            for key in same:
                better = same[key] > diff[key] if hib else same[key] < diff[key]
                _require(better, who, "tells different sets apart",
                         f"{key} = {same[key]!r} for a set against itself but {diff[key]!r} against a different set "
                         f"(higher_is_better={hib})")
        else:
            _require(not _close(same, diff, rtol, atol), who, "tells different sets apart",
                     f"the same value {same} for a set against itself and against a different set")
        inv = "reset clears the state"
        after = _measure(metric, [samples], [samples], who, inv)  # _measure resets first
        _require(_close(after, same, rtol, atol), who, inv,
                 f"after reset() the metric gives {after}, a fresh comparison gives {same}")
    half = samples.shape[0] // 2
    if half >= 2:
        inv = "update accumulates"
        split = _measure(metric, [samples[:half], samples[half:]], [samples], who, inv)
        whole = _measure(metric, [samples], [samples], who, inv)
        _require(_close(split, whole, 1e-4, 1e-6), who, inv,
                 f"updating with the set in two halves gives {split}, one update gives {whole}")
    with _checking(who, "reset clears the state"):
        metric.reset()


def check_model_metric(metric: Any, model: Any, data: Any, *, name: str | None = None, seed: int = 0) -> None:
    """``evaluate(model, data, generator)``: finite float values, deterministic given the generator."""
    who = f"metric {name or type(metric).__name__!r}"
    _require(callable(getattr(metric, "evaluate", None)), who, "protocol", "missing method evaluate()")
    results = []
    for global_seed in (1, 2):
        with _checking(who, "deterministic given the generator"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed)
            out = metric.evaluate(model, data, torch.Generator().manual_seed(seed))
        _require(isinstance(out, Mapping), who, "finite values",
                 f"evaluate() returned {type(out).__name__}, not a dict")
        results.append(_values(out, who))
    _require(results[0] == results[1], who, "deterministic given the generator",
             f"two evaluations with equally seeded generators give {results[0]} and {results[1]}")
