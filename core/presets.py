"""Named presets of a component's options, shared by the backbone plugins.

A config class whose fields default to ``None`` takes, for every field the
experiment left unset, the value of its ``preset`` (a key of ``presets``), and
failing that the value in ``defaults``:

    value(field) = experiment's  if set  else  presets[preset][field]  if present  else  defaults[field]

An unknown preset is a `registry.ConfigError` at key ``preset`` that lists the
presets and the closest name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from registry import ConfigError, did_you_mean


def fill_from_preset(config: Any, presets: Mapping[str, Mapping[str, Any]], defaults: Mapping[str, Any]) -> None:
    """Fill the unset (None) fields of the attrs instance `config` in place from ``config.preset``, then `defaults`.

    Lists and tuples are copied into fresh lists, so no two configs share a preset's list.
    """
    if config.preset is not None and config.preset not in presets:
        raise ConfigError(f"unknown preset {config.preset!r}{did_you_mean(config.preset, presets)}; "
                          f"presets: {', '.join(presets)}", ("preset",))
    values = {**defaults, **presets.get(config.preset, {})}
    for field in attrs.fields(type(config)):
        if field.name != "preset" and getattr(config, field.name) is None and field.name in values:
            value = values[field.name]
            setattr(config, field.name, list(value) if isinstance(value, (list, tuple)) else value)
