"""Describe a component's options (from its attrs config class): name, type, default, documentation."""

from __future__ import annotations

import inspect
import re

import attrs

import registry
from registry import ConfigError
from registry.convert import _type_name


def _field_docs(cls: type) -> dict[str, str]:
    """Per-field docs from a docstring's ``Attributes:``/``Args:`` section (``name: text`` lines)."""
    doc = inspect.getdoc(cls) or ""
    docs: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        m = re.match(r"^\s{0,8}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if m and m.group(1) in {f.name for f in attrs.fields(cls)}:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.strip() and line.startswith(" "):
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def options_table(kind: str, name: str) -> list[tuple[str, str, str, str]]:
    """(option, type, default, doc) rows of component `name` of `kind`."""
    comp = registry.get(kind, name)
    cls = comp.config_class()
    if cls is None:
        return []
    attrs.resolve_types(cls)
    docs = _field_docs(cls)
    rows = []
    for f in attrs.fields(cls):
        if f.default is attrs.NOTHING:
            default = "(required)"
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            default = repr(f.default.factory()) if not f.default.takes_self else "(computed)"
        else:
            default = repr(f.default)
        rows.append((f.name, _type_name(f.type), default, docs.get(f.name, "")))
    return rows


def describe(*names: str) -> str:
    """Text for ``flowforge plugins --options [KIND] NAME``."""
    if len(names) == 2:
        kind, name = names
        if kind not in registry.kinds():
            raise ConfigError(f"--options: unknown kind {kind!r}{registry.did_you_mean(kind, registry.kinds())}; "
                              f"kinds: {', '.join(sorted(registry.kinds()))}")
        kinds = [kind]
    elif len(names) == 1:
        name = names[0]
        kinds = [k for k in registry.kinds() if name in registry.available(k)]
        if not kinds:
            every = sorted({n for k in registry.kinds() for n in registry.available(k)})
            raise ConfigError(f"no component named {name!r}{registry.did_you_mean(name, every)}")
    else:
        raise ConfigError("--options takes NAME or KIND NAME")
    out = []
    for kind in kinds:
        comp = registry.get(kind, name)
        cls = comp.config_class()
        out.append(f"{kind} {name!r} (plugin {comp.plugin}, distribution {comp.distribution})")
        doc = inspect.getdoc(cls).splitlines()[0] if cls is not None and inspect.getdoc(cls) else (comp.doc or "")
        if doc:
            out.append(f"  {doc}")
        rows = options_table(kind, name)
        if not rows:
            out.append("  (no options)")
        for opt, typ, default, text in rows:
            out.append(f"  {opt}: {typ} = {default}" + (f"\n      {text}" if text else ""))
    return "\n".join(out)
