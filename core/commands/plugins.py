"""``flowforge plugins``: distributions, versions and the components each provides.

``flowforge plugins --options KIND NAME`` (or ``--options NAME``) prints a
component's options with types, defaults and documentation.
"""

from __future__ import annotations

import argparse
import json

import registry

NAME = "plugins"
HELP = "list installed plugins and their components"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--options", nargs="+", metavar="NAME", help="show the options of a component: [KIND] NAME")


def main(args: argparse.Namespace) -> int:
    if args.options:
        from core.options import describe

        print(describe(*args.options))
        return 0
    infos = registry.plugins()
    if args.json:
        print(json.dumps([{"name": p.name, "distribution": p.distribution, "version": p.version, "module": p.module,
                           "components": [list(c) for c in p.components], "kinds": p.kinds, "commands": p.commands,
                           "error": p.error} for p in infos], indent=2))
        return 0
    by_dist: dict[tuple[str, str], list[registry.PluginInfo]] = {}
    for info in infos:
        by_dist.setdefault((info.distribution, info.version), []).append(info)
    for (dist, version), group in by_dist.items():
        print(f"{dist} {version}")
        for info in group:
            if info.error:
                print(f"  {info.name}: {info.error}")
                continue
            empty = not (info.components or info.kinds or info.commands)
            print(f"  {info.name} ({info.module})" + (": (no components)" if empty else ""))
            for line in _contributions(info):
                print(f"    {line}")
    return 0


def _contributions(info: registry.PluginInfo) -> list[str]:
    """One line per kind, command and component the plugin registered."""
    kinds = {k.name: k for k in registry.declared_kinds()}
    commands = {c.name: c for c in registry.commands()}
    lines = []
    for name in info.kinds:
        k = kinds[name]
        section = f"[[{k.section}]]" if k.many else f"[{k.section}]"
        needs = f"needs {', '.join(k.needs)}; " if k.needs else ""
        lines.append(f"kind:{name}  section {section}{' (required)' if k.required else ''}, {needs}provides "
                     f"{k.provides!r}" + (f"  {k.doc}" if k.doc else ""))
    lines += [f"command:{name}  {commands[name].help}" for name in info.commands]
    for kind, name in sorted(info.components):
        doc = _doc(kind, name)
        lines.append(f"{kind}:{name}" + (f"  {doc}" if doc else ""))
    return lines


def _doc(kind: str, name: str) -> str:
    """The one-line ``doc=`` of a registration ("" when it has none)."""
    try:
        return registry.get(kind, name).doc or ""
    except Exception:  # noqa: BLE001 - a listing never fails on one component
        return ""
