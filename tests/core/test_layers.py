"""The import direction of `core.layers`, checked on the source with ``ast``.

Every ``import`` / ``from ... import`` of every module under ``core/``, ``registry/``,
``plugins/`` and the example third-party package is read at any nesting level (function-local
and ``TYPE_CHECKING`` imports included; relative imports resolved). Rules:

- ``registry`` imports nothing of ``core`` or ``plugins`` (it is the ground floor);
- a ``core`` module imports no plugin package, and no ``core`` module of a higher layer;
- every ``core`` module belongs to exactly the layer `core.layers.layer_of` names;
- a plugin imports of ``core`` only the interfaces and helpers layers and ``core.runs``, and of
  ``plugins`` only its own package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import layers

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flowforge-sde" / "src"


def module_name(file: Path, base: Path) -> str:
    parts = list(file.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, base: Path) -> bool:
    path = base.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(file: Path, base: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in `file`; ``from pkg import mod`` yields ``pkg.mod``."""
    me = module_name(file, base)
    package = me if file.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                source = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                yield node.lineno, full if is_module(full, base) else source


def top(name: str) -> str:
    return name.split(".")[0]


def violations(file: Path, base: Path) -> Iterator[str]:
    me = module_name(file, base)
    where = file.relative_to(ROOT)
    for line, target in imports(file, base):
        if top(target) not in ("core", "registry", "plugins"):
            continue
        say = f"{where}:{line}: `{me}` imports `{target}`"
        if top(me) == "registry":
            if top(target) != "registry":
                yield f"{say}; rule: registry is the ground floor and imports nothing of core or plugins"
        elif top(me) == "core":
            if top(target) == "plugins":
                yield f"{say}; rule: core imports no plugin package (reach components through the registry)"
            elif top(target) == "core":
                mine, theirs = layers.layer_of(me), layers.layer_of(target)
                if theirs is None:
                    yield f"{say}, which is in no layer; rule: add it to core.layers.LAYERS"
                elif mine is not None and theirs.level > mine.level:
                    yield (f"{say} ({theirs.name}, level {theirs.level}) from {mine.name} (level {mine.level}); "
                           f"rule: a core module imports only its own layer and the layers below")
        else:  # a plugin package
            if top(target) == "core" and not layers.plugin_may_import(target):
                layer = layers.layer_of(target)
                yield (f"{say} ({layer.name if layer else 'no layer'}); rule: plugins import only registry, the "
                       f"{' and '.join(layers.PLUGIN_LAYERS)} layers and {', '.join(layers.PLUGIN_PUBLIC)}")
            own = ".".join(me.split(".")[:2]) if top(me) == "plugins" else top(me)
            if top(target) == "plugins" and target != own and not target.startswith(own + "."):
                yield (f"{say}; rule: a plugin never imports another plugin package (use registry.build or "
                       f"a core helper)")


def sources() -> list[tuple[Path, Path]]:
    found = [(f, ROOT) for d in ("core", "registry", "plugins") for f in sorted((ROOT / d).rglob("*.py"))]
    return found + [(f, EXAMPLE) for f in sorted(EXAMPLE.rglob("*.py"))]


def test_every_import_follows_the_layers():
    wrong = [v for file, base in sources() for v in violations(file, base)]
    assert not wrong, "imports against the direction of core.layers:\n" + "\n".join(wrong)


def test_every_core_module_is_in_one_layer_and_every_listed_module_exists():
    missing = [module_name(f, ROOT) for f in sorted((ROOT / "core").rglob("*.py"))
               if layers.layer_of(module_name(f, ROOT)) is None]
    assert not missing, f"core modules in no layer of core.layers.LAYERS: {missing}"
    stale = [m for layer in layers.LAYERS for m in layer.modules if not is_module(m, ROOT)]
    assert not stale, f"core.layers lists modules that do not exist: {stale}"
    assert [layer.level for layer in layers.LAYERS] == list(range(len(layers.LAYERS)))


@pytest.mark.parametrize("source, line, rule", [
    ("core/config.py", "from .trainer import Trainer", "own layer and the layers below"),
    ("core/build.py", "import plugins.mlp", "core imports no plugin package"),
    ("registry/manager.py", "from core import config", "ground floor"),
    ("plugins/mlp/model.py", "from core.trainer import Trainer", "plugins import only"),
    ("plugins/mlp/model.py", "from core import build", "plugins import only"),
    ("plugins/dit/model.py", "from plugins.unet.model import UNet", "another plugin package"),
    ("plugins/dit/model.py", "from ..unet import model", "another plugin package"),
])
def test_a_wrong_arrow_is_named_with_file_import_and_rule(tmp_path, source, line, rule):
    """The checker itself: a planted wrong import (here inside a function) is reported."""
    fake = tmp_path / source
    fake.parent.mkdir(parents=True, exist_ok=True)
    for init in (fake.parent / "__init__.py", fake.parent.parent / "__init__.py"):
        init.touch()
    fake.write_text(f"def f():\n    {line}\n")
    for name in ("core/trainer.py", "core/build.py", "core/config.py", "plugins/unet/model.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = list(violations(fake, tmp_path))
    finally:
        ROOT = saved
    assert len(found) == 1 and rule in found[0] and source in found[0] and ":2:" in found[0], found
