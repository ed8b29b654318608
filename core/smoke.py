"""Smoke mode (``--smoke``): a quick look at any experiment, every phase scaled down.

A smoke run is the same experiment (data, model, objective, solver, metrics) with
each phase's budget capped, so that it finishes in seconds to a minute on a CPU:

| phase | cap |
|---|---|
| training | ``trainer.steps <= 30`` (``epochs``/``warmup_epochs`` off, ``warmup_steps <= 3``), no intermediate checkpoints |
| evaluation during training | off (``eval.every = eval.samples_every = 0``) |
| final, untrained and floor evaluation | ``eval.num_samples <= 200``, ``eval.num_pictures <= 16`` |
| metric options | ``num_samples``/``num_examples`` <= 200, ``train_steps`` (feature networks) <= 50, ``subsets`` <= 10, ``subset_size`` <= 100, ``respacing`` of a full-length bound -> 25 steps |

The caps are written as ``--set`` overrides (printed, and recorded in config.toml
like any override), applied after the user's own ``--set`` values, so a smoke run
is reproducible with the printed command. Numbers from a smoke run are not results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

#: (section, key, cap) for the core sections.
CORE_CAPS = (("trainer", "steps", 30), ("trainer", "warmup_steps", 3), ("eval", "num_samples", 200),
             ("eval", "num_pictures", 16))
#: metric option -> cap (applied when the metric has the option).
METRIC_CAPS = {"num_samples": 200, "num_examples": 200, "train_steps": 50, "subsets": 10, "subset_size": 100}
#: metric option -> value used in place of "every step" ("" respacing).
METRIC_FULL_LENGTH = {"respacing": "25"}


def smoke_overrides(exp: Any) -> list[str]:
    """``--set`` texts that cap every phase of the resolved experiment `exp` (see the module docstring)."""
    out = []
    resolved = exp.to_dict()
    for section, key, cap in CORE_CAPS:
        if resolved[section][key] > cap:
            out.append(f"{section}.{key}={cap}")
    for section, key in (("trainer", "epochs"), ("trainer", "warmup_epochs"), ("trainer", "checkpoint_every"),
                         ("eval", "every"), ("eval", "samples_every")):
        if resolved[section].get(key):
            out.append(f"{section}.{key}=0")
    for index, metric in enumerate(exp.metrics):
        out += _metric_overrides(index, metric)
    return out


def _capped(table: Mapping[str, Any]) -> dict[str, Any]:
    """`table` with every `METRIC_CAPS` option above its cap set to the cap."""
    return {k: min(v, METRIC_CAPS[k]) if k in METRIC_CAPS and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in table.items()}


def _inline(value: Any) -> str:
    """`value` (a resolved option: table, list, string, number, bool) as TOML inline text."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _metric_overrides(index: int, metric: Mapping[str, Any]) -> list[str]:
    out = []
    for key, cap in METRIC_CAPS.items():
        value = metric.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            out.append(f"metrics.{index}.{key}={cap}")
    for key, table in metric.items():  # a nested component's table (a metric's features): capped whole
        if isinstance(table, Mapping) and _capped(table) != dict(table):
            out.append(f"metrics.{index}.{key}={_inline(_capped(table))}")
    for key, value in METRIC_FULL_LENGTH.items():
        if metric.get(key) == "":
            out.append(f'metrics.{index}.{key}="{value}"')
    return out


def apply_smoke(raw: Mapping[str, Any], file: str | None = None) -> dict[str, Any]:
    """`raw` (a parsed file, overrides applied) with the smoke caps set; stage overrides are capped too."""
    from . import config

    base, stages = config.split_stages(raw, file)
    texts = smoke_overrides(config.resolve(base, file=file))
    if texts:
        print("flowforge: smoke mode: --set " + " --set ".join(texts))
    out = config.apply_overrides(raw, texts)
    caps = {f"{section}.{key}": cap for section, key, cap in CORE_CAPS}
    for stage in out.get(config.STAGES_KEY, []):
        for key, value in list(stage.get("set", {}).items()):
            if key in caps and isinstance(value, int) and value > caps[key]:
                stage["set"][key] = caps[key]
            elif key in ("trainer.epochs", "trainer.warmup_epochs", "trainer.checkpoint_every"):
                stage["set"][key] = 0
    return out
