"""Strict structuring of plain mappings (from TOML) into attrs config classes.

cattrs does the work; this module makes it strict (no silent `"5" -> 5` or
`2.7 -> 2`, unknown keys forbidden, NaN and infinities refused) and turns its
exception groups into one `ConfigError` whose message names the key path, what
was expected, and the closest valid key.

Every float option must be finite (TOML's ``nan``, ``inf`` and ``-inf`` are
refused, inside lists and unions too) unless its field opts in with
``attrs.field(..., metadata={NON_FINITE: True})``, e.g. an upper bound whose
documented "no bound" value is ``inf``.
"""

from __future__ import annotations

import contextvars
import enum
import math
import pathlib
import typing
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
import cattrs.gen
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)

from .errors import ConfigError, did_you_mean

#: attrs field metadata key: ``metadata={NON_FINITE: True}`` lets a float option be NaN or infinite.
NON_FINITE = "flowforge_non_finite"
_non_finite_ok: contextvars.ContextVar[bool] = contextvars.ContextVar("flowforge_non_finite_ok", default=False)


def _type_name(tp: Any) -> str:
    if tp is None or tp is type(None):
        return "nothing"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple, typing.Sequence, __import__("collections.abc").abc.Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of ({_type_name(args[0])})" if args else "a list"
    if origin in (dict, typing.Mapping, __import__("collections.abc").abc.Mapping):
        return "a table"
    if attrs.has(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _strict_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Mismatch(int, value)
    return value


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Mismatch(float, value)
    value = float(value)
    if not math.isfinite(value) and not _non_finite_ok.get():
        raise _NonFinite(value)
    return value


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise _Mismatch(str, value)
    return value


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise _Mismatch(bool, value)
    return value


def _strict_path(value: Any, _: Any) -> pathlib.Path:
    if not isinstance(value, (str, pathlib.Path)):
        raise _Mismatch(str, value)
    return pathlib.Path(value)


class _Mismatch(TypeError):
    def __init__(self, expected: Any, value: Any):
        self.expected, self.value = expected, value
        super().__init__(f"expected {_type_name(expected)}, got {value!r}")


class _NonFinite(_Mismatch):
    def __init__(self, value: float):
        TypeError.__init__(self, f"expected a finite number, got {value}")
        self.expected, self.value = float, value


def _allowing_non_finite(value: Any, tp: Any) -> Any:
    """Structure one field whose metadata opts in to NaN and infinities."""
    token = _non_finite_ok.set(True)
    try:
        return converter.structure(value, tp)
    finally:
        _non_finite_ok.reset(token)


def _attrs_structure_fn(conv: cattrs.Converter) -> Any:
    """The converter's attrs hook, with `_allowing_non_finite` on the fields marked `NON_FINITE`."""
    def factory(cls: type) -> Any:
        if any(isinstance(f.type, str) for f in attrs.fields(cls)):
            attrs.resolve_types(cls)  # PEP 563 annotations
        overrides = {f.name: cattrs.gen.override(struct_hook=_allowing_non_finite)
                     for f in attrs.fields(cls) if f.metadata.get(NON_FINITE)}
        return cattrs.gen.make_dict_structure_fn(cls, conv, **overrides)
    return factory


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Literal


def _structure_literal(value: Any, tp: Any) -> Any:
    choices = typing.get_args(tp)
    if not any(value == c and type(value) is type(c) for c in choices):
        hint = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise TypeError(f"expected {_type_name(tp)}, got {value!r}{hint}")
    return value


def _is_union(tp: Any) -> bool:
    import types

    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _structure_union(value: Any, tp: Any) -> Any:
    """Untagged unions of scalars/lists: the first member that accepts the value wins."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    if isinstance(value, float) and not math.isfinite(value) and not _non_finite_ok.get():
        raise _NonFinite(value)
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return converter.structure(value, arg)
        except Exception as exc:  # noqa: BLE001 - try the next member
            errors.append(exc)
    raise TypeError(f"expected {_type_name(tp)}, got {value!r}")


def make_converter() -> cattrs.Converter:
    """A cattrs converter that forbids unknown keys and never coerces types."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(pathlib.Path, _strict_path)
    conv.register_structure_hook_func(_is_literal, _structure_literal)
    conv.register_structure_hook_func(_is_union, _structure_union)
    conv.register_structure_hook_factory(attrs.has, _attrs_structure_fn(conv))
    conv.register_unstructure_hook(pathlib.Path, str)
    conv.register_unstructure_hook(enum.Enum, lambda e: e.value)
    return conv


converter = make_converter()


def _field_names(cls: Any) -> list[str]:
    return [f.name for f in attrs.fields(cls)] if attrs.has(cls) else []


def _messages(exc: BaseException, cls: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
    """Flatten a cattrs exception group into (key path, message) pairs."""
    out: list[tuple[tuple[str, ...], str]] = []
    if isinstance(exc, BaseValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(note, AttributeValidationNote):
                sub_path, sub_cls = (*path, note.name), note.type
                if isinstance(sub, KeyError):
                    out.append((sub_path, f"required key missing: expected {_type_name(note.type)}"))
                    continue
            elif isinstance(note, IterableValidationNote):
                sub_path, sub_cls = (*path, f"[{note.index}]"), note.type
            else:
                sub_path, sub_cls = path, None
            out.extend(_messages(sub, sub_cls, sub_path))
        for sub in without:
            out.extend(_messages(sub, getattr(exc, "cl", cls), path))
        return out
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = _field_names(exc.cl)
        for key in sorted(exc.extra_fields):
            out.append(((*path, key), f"unknown key{did_you_mean(key, valid)}; valid keys: {', '.join(valid) or '(none)'}"))
        return out
    if isinstance(exc, ConfigError):
        return [((*path, *exc.path), exc.message)]
    if isinstance(exc, _Mismatch):
        return [(path, str(exc))]
    if isinstance(exc, (TypeError, ValueError)):
        text = str(exc)
        if not text.startswith("expected") and cls is not None:
            text = f"expected {_type_name(cls)}: {text}"
        return [(path, text)]
    return [(path, f"{type(exc).__name__}: {exc}")]


def structure(mapping: Mapping[str, Any], cls: type, path: tuple[str, ...] = ()) -> Any:
    """Structure `mapping` into the attrs class `cls`, strictly.

    Raises:
        ConfigError: naming every offending key path (the first one leads).
    """
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"expected a table, got {mapping!r}", path)
    try:
        return converter.structure(dict(mapping), cls)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated into a ConfigError
        found = _messages(exc, cls, ()) or [((), str(exc))]
        found.sort(key=lambda item: not item[1].startswith("unknown key"))  # a misspelt key before the key it misses
        first_path, first_msg = found[0]
        extra = "".join(f"\n  also {'.'.join(p) or '(top)'}: {m}" for p, m in found[1:])
        raise ConfigError(first_msg + extra, (*path, *first_path)) from None


def unstructure(obj: Any) -> Any:
    """The plain (TOML-ready) form of an attrs config object."""
    return converter.unstructure(obj)
