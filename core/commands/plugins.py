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
                           "components": [list(c) for c in p.components], "error": p.error} for p in infos], indent=2))
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
            print(f"  {info.name} ({info.module})" + ("" if info.components else ": (no components)"))
            for kind, name in sorted(info.components):
                doc = _doc(kind, name)
                print(f"    {kind}:{name}" + (f"  {doc}" if doc else ""))
    return 0


def _doc(kind: str, name: str) -> str:
    """The one-line ``doc=`` of a registration ("" when it has none)."""
    try:
        return registry.get(kind, name).doc or ""
    except Exception:  # noqa: BLE001 - a listing never fails on one component
        return ""
