"""The plugin reference (docs/plugins.md) documents every hook and every interface, and
docs/configuration.md is what docs/generate_configuration.py writes today.

A hook is documented when a heading of docs/plugins.md names it and its section
mentions each of its parameters. A public name of core/interfaces.py is
documented when a heading names it and its section mentions each of its public
methods as ``Class.method`` (``__call__`` included) and each of its attributes.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import types
from pathlib import Path

import pytest

import registry
from registry import hookspecs

ROOT = Path(__file__).resolve().parents[2]
PLUGINS_MD = ROOT / "docs" / "plugins.md"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
INTERFACES = ROOT / "core" / "interfaces.py"
REGENERATE = "python docs/generate_configuration.py"


# --------------------------------------------------------------------------- what must be documented
def hook_entries() -> dict[str, list[str]]:
    """{hook name: its parameters} for every hookspec in registry.hookspecs."""
    marker = f"{hookspecs.PROJECT}_spec"
    out = {}
    for _, cls in inspect.getmembers(hookspecs, inspect.isclass):
        if cls.__module__ != hookspecs.__name__:
            continue
        for name, fn in vars(cls).items():
            if callable(fn) and hasattr(fn, marker):
                out[name] = [p for p in inspect.signature(fn).parameters if p != "self"]
    return out


def interface_entries(source: str | None = None) -> dict[str, list[str]]:
    """{public name of core/interfaces.py: its public methods (as ``Class.method``) and attributes}."""
    tree = ast.parse(source if source is not None else INTERFACES.read_text())
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            members = []
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if not item.name.startswith("_") or item.name == "__call__":
                        members.append(f"{node.name}.{item.name}")  # methods: written qualified
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if not item.target.id.startswith("_"):
                        members.append(item.target.id)
            out[node.name] = members
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and not target.id.startswith("_"):
                    out[target.id] = []
    return out


# --------------------------------------------------------------------------- what the page says
def sections(markdown: str) -> list[tuple[int, str, str]]:
    """(level, heading, body up to the next heading of the same or a higher level) for every heading."""
    lines = markdown.splitlines()
    heads = []
    fence = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            heads.append((i, len(m.group(1)), m.group(2)))
    out = []
    for k, (i, level, title) in enumerate(heads):
        end = next((j for j, lvl, _ in heads[k + 1:] if lvl <= level), len(lines))
        out.append((level, title, "\n".join(lines[i + 1:end])))
    return out


def missing(markdown: str, entries: dict[str, list[str]], what: str) -> list[str]:
    """Human-readable list of what `markdown` fails to document."""
    found = sections(markdown)
    problems = []
    for name, members in entries.items():
        match = [body for _, title, body in found if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", title)]
        if not match:
            problems.append(f"{what} {name}: no heading of docs/plugins.md names it")
            continue
        body = "\n".join(match)
        for member in members:
            before = r"(?<![\w.])" if "." in member else r"(?<!\w)"  # attributes may be written Class.attr
            if not re.search(rf"{before}{re.escape(member)}(?!\w)", body):
                label = member if "." in member else f"{name}.{member}"
                problems.append(f"{what} {label}: not mentioned in the section for {name}")
    return problems


# --------------------------------------------------------------------------- the tests
def test_every_hook_is_documented():
    entries = hook_entries()
    assert "flowforge_register" in entries and entries["flowforge_register"] == ["register"]
    problems = missing(PLUGINS_MD.read_text(), entries, "hook")
    assert not problems, "docs/plugins.md must document every hook in registry/hookspecs.py:\n" + "\n".join(problems)


def test_every_interface_is_documented():
    entries = interface_entries()
    assert {"Scheduler", "Path", "Solver", "Objective", "DataSource", "Launcher", "SampleMetric"} <= set(entries)
    assert "Scheduler.__call__" in entries["Scheduler"] and "num_examples" in entries["DataSource"]
    problems = missing(PLUGINS_MD.read_text(), entries, "interface")
    assert not problems, ("docs/plugins.md must document every public class, method and attribute of "
                          "core/interfaces.py:\n" + "\n".join(problems))


def test_the_checker_notices_an_undocumented_hook_and_interface():
    text = PLUGINS_MD.read_text()
    without_hook = re.sub(r"^### `flowforge_register\(register\)`$", "### (removed)", text, flags=re.M)
    problems = missing(without_hook, hook_entries(), "hook")
    assert "hook flowforge_register: no heading of docs/plugins.md names it" in problems
    new_hook = {**hook_entries(), "flowforge_commands": ["add_command"]}
    assert any("flowforge_commands" in p for p in missing(text, new_hook, "hook"))
    source = INTERFACES.read_text() + (
        "\n\nclass Sampler(abc.ABC):\n    def draw(self, n):\n        ...\n"
        "\n\nclass _Private:\n    pass\n")
    entries = interface_entries(source)
    assert "_Private" not in entries and entries["Sampler"] == ["Sampler.draw"]
    assert "interface Sampler: no heading of docs/plugins.md names it" in missing(text, entries, "interface")
    without_method = text.replace("Solver.sample(model", "Solver.run(model")
    assert "interface Solver.sample: not mentioned in the section for Solver" in missing(
        without_method, interface_entries(), "interface")


def test_the_api_version_is_documented():
    text = PLUGINS_MD.read_text()
    assert f"API_VERSION = {hookspecs.API_VERSION}" in text and f"FLOWFORGE_API = {hookspecs.API_VERSION}" in text
    assert "refused: built for flowforge plugin API" in text


def test_every_kind_and_its_context_is_documented():
    text = PLUGINS_MD.read_text()
    for kind in ("data", "scheduler", "path", "backbone", "objective", "solver", "metric", "launcher"):
        assert re.search(rf"^\s*\| `{kind}` \|", text, flags=re.M), kind


def test_the_tested_example_is_a_working_plugin():
    """The block marked 'tested' in docs/plugins.md registers a solver that passes the kit."""
    from core.testing.solvers import check_solver

    text = PLUGINS_MD.read_text()
    block = re.search(r"<!-- tested:[^>]*-->\n```python\n(.*?)```", text, flags=re.S)
    assert block, "docs/plugins.md lost its tested example block"
    module = types.ModuleType("docs_example_plugin")
    exec(compile(block.group(1), "docs/plugins.md", "exec"), module.__dict__)
    with registry.temporary_plugin(module, name="docs_example_plugin", distribution="(docs)") as info:
        assert info.error is None and info.components == [("solver", "heun_doc")]
        check_solver(lambda method, steps: registry.build("solver", {"plugin": "heun_doc", "steps": steps}),
                     {"heun": (2, 2)})


def test_python_blocks_parse():
    for block in re.findall(r"```python\n(.*?)```", PLUGINS_MD.read_text(), flags=re.S):
        ast.parse(block)


def test_configuration_reference_is_up_to_date():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate_configuration
    finally:
        sys.path.remove(str(ROOT / "docs"))
    expected = generate_configuration.generate()
    current = CONFIGURATION_MD.read_text() if CONFIGURATION_MD.exists() else ""
    if current != expected:
        import difflib

        diff = "".join(list(difflib.unified_diff(current.splitlines(True), expected.splitlines(True),
                                                 "docs/configuration.md (checked in)", "generated", n=1))[:60])
        pytest.fail(f"docs/configuration.md is out of date: regenerate it with `{REGENERATE}` and commit it.\n{diff}")


def test_configuration_reference_covers_every_first_party_component():
    text = CONFIGURATION_MD.read_text()
    for kind in registry.kinds():
        for name in registry.available(kind):
            if registry.get(kind, name).distribution == "flowforge":
                assert f"### `{name}`" in text, f"{kind} {name!r} is missing: run {REGENERATE}"


def test_generator_check_mode(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate_configuration
    finally:
        sys.path.remove(str(ROOT / "docs"))
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    assert generate_configuration.main(["--check", "--output", str(stale)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert generate_configuration.main(["--output", str(stale)]) == 0
    assert generate_configuration.main(["--check", "--output", str(stale)]) == 0
