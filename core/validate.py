"""Checks for config classes' ``__attrs_post_init__``: each raises a `ConfigError` naming the key.

    @attrs.define
    class MyConfig:
        width: int = 64
        dropout: float = 0.0

        def __attrs_post_init__(self):
            positive(self, "width")
            fraction(self, "dropout")

Non-finite floats never reach these checks: `registry.structure` refuses NaN
and infinities for every float option (see `registry.convert.NON_FINITE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from registry import ConfigError, did_you_mean


def _values(value: Any) -> Iterable[Any]:
    return value if isinstance(value, (list, tuple)) else [value]


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError("expected <expected>, got <value>", (key,))`` unless `ok`."""
    if not ok:
        raise ConfigError(f"expected {expected}, got {value!r}", (key,))


def positive(config: Any, *keys: str) -> None:
    """Each option (or every item of a list option) is > 0."""
    for key in keys:
        value = getattr(config, key)
        require(all(v > 0 for v in _values(value)), key, "a positive number" if isinstance(value, float)
                else "a positive integer" if isinstance(value, int) else "positive numbers", value)


def non_negative(config: Any, *keys: str) -> None:
    """Each option (or every item of a list option) is >= 0."""
    for key in keys:
        value = getattr(config, key)
        require(all(v >= 0 for v in _values(value)), key, "a non-negative number", value)


def fraction(config: Any, *keys: str, closed: bool = False) -> None:
    """Each option lies in [0, 1) (``closed=True``: [0, 1])."""
    for key in keys:
        value = getattr(config, key)
        ok = all(0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0 for v in _values(value))
        require(ok, key, f"a number in [0, 1{']' if closed else ')'}", value)


def device_available(device: str, key: str = "device") -> None:
    """A device named ``"cuda"`` / ``"cuda:N"`` must exist on this machine."""
    if not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{device!r} was asked for but no CUDA device is visible on this machine "
                          f"(use \"auto\" or \"cpu\")", (key,))
    index = str(device).partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", (key,))


#: Options that only mean something for class-conditional data (the null label is ``num_classes``).
CONDITIONING_KEYS = ("label_dropout", "class_dropout_prob", "guidance_scale")


def conditioning(sections: Mapping[str, Mapping[str, Any]], num_classes: int, file: str | None = None) -> None:
    """Refuse label dropout and guidance (any non-zero `CONDITIONING_KEYS` option) on data without labels.

    `sections`: key path -> resolved mapping, e.g. ``{"objective": {...}, "metrics[0]": {...}, "eval": {...}}``.
    """
    if num_classes > 0:
        return
    for section, mapping in sections.items():
        for key in CONDITIONING_KEYS:
            value = mapping.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0:
                raise ConfigError(f"{key} = {value} needs class-conditional data, but the data has no class labels "
                                  f"(num_classes = 0): set it to 0 or use labelled data", (section, key), file)


def monitor_result(monitor: str, metrics: Mapping[str, Any], file: str | None = None) -> None:
    """``trainer.monitor = "NAME/RESULT"`` must be one of the results metric NAME declares in ``result_names``.

    A metric declares ``result_names = ()`` for a single number, ``("precision", "recall")`` for a table;
    a metric that declares nothing is not checked.
    """
    name, _, result = monitor.partition("/")
    declared = getattr(metrics.get(name), "result_names", None)
    if not monitor or declared is None:
        return
    valid = [f"{name}/{r}" for r in declared] or [name]
    if monitor not in valid:
        raise ConfigError(f"{monitor!r} is not an evaluation result{did_you_mean(monitor, valid)}; metric {name!r} "
                          f"reports: {', '.join(valid)}", ("trainer", "monitor"), file)
