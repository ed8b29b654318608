"""The shape of core/ and registry/: short functions, and no first-party plugin named in core.

Function length: ``end_lineno - lineno + 1`` of every ``def`` (from the ``def`` line to the last
line of its body; decorators not counted), minus the lines of its docstring. A nested function
counts in its parent's length as well as on its own. The limit is 60 lines.

First-party names: the components registered by the ``flowforge`` distribution itself. No Python
string constant of ``core/`` equals one (docstrings and comments may mention them), no string of
``core/`` writes ``plugin = "NAME"`` or ``"plugin": "NAME"`` with one, and no template under
``core/templates`` does either. `ALLOWED` lists the strings that are the same word but not the
plugin, each with its meaning.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import registry
from registry.manager import HOME_DISTRIBUTION

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 60

#: (file, string) pairs that equal a first-party component's name but mean something else.
ALLOWED = {
    ("core/config.py", "cosine"): "trainer.lr_schedule's cosine decay of the learning rate",
    ("core/optim.py", "cosine"): "trainer.lr_schedule's cosine decay of the learning rate",
    ("core/rundir.py", "accelerate"): "the accelerate distribution, whose version env.json records",
    ("core/commands/new_plugin.py", "accelerate"): "an import name a generated package must not shadow",
    ("core/runs.py", "raw"): "which weights a loaded run holds: the raw ones, not the EMA",
    ("core/pretrained.py", "raw"): "which weights a loaded run holds: the raw ones, not the EMA",
}
NAMED = re.compile(r"""(?:\bplugin\b\s*=\s*|["']plugin["']\s*:\s*)\\?["'](\w+)\\?["']""")


def function_lengths(file: Path) -> list[tuple[int, str, int]]:
    """(length, name, line) of every function in `file`, measured as the module docstring says."""
    out = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                length -= first.end_lineno - first.lineno + 1
            out.append((length, node.name, node.lineno))
    return out


def test_no_function_in_core_or_registry_is_longer_than_60_lines():
    long = [f"{f.relative_to(ROOT)}:{line} {name}: {n} lines"
            for d in ("core", "registry") for f in sorted((ROOT / d).rglob("*.py"))
            for n, name, line in function_lengths(f) if n > LIMIT]
    assert not long, f"functions longer than {LIMIT} lines (docstring excluded):\n" + "\n".join(long)


def test_the_length_rule_counts_body_not_docstring_or_decorators(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('@decorator\ndef f():\n    """Doc\n\n    more doc.\n    """\n    a = 1\n    return a\n')
    assert function_lengths(source) == [(3, "f", 2)]  # def line + two body lines


def first_party_names() -> set[str]:
    return {name for info in registry.plugins() if info.distribution == HOME_DISTRIBUTION
            for _, name in info.components}


def named_plugins(text: str, file: str, names: set[str]) -> list[str]:
    """Where Python source `text` names a first-party component in a string (docstrings excluded)."""
    tree = ast.parse(text)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    hits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        found = {node.value} & names - {value for (where, value) in ALLOWED if where == file}
        found |= {m for m in NAMED.findall(node.value) if m in names}
        hits += [(node.lineno, f"{file}:{node.lineno}: {value!r}") for value in sorted(found)]
    return [text for _, text in sorted(hits)]


def test_core_names_no_first_party_plugin():
    names = first_party_names()
    assert {"local", "toy2d", "mlp", "cond_ot", "ode"} <= names  # the registry sees flowforge's own plugins
    hits = []
    for file in sorted((ROOT / "core").rglob("*.py")):
        hits += named_plugins(file.read_text(), str(file.relative_to(ROOT)), names)
    for file in sorted((ROOT / "core" / "templates").iterdir()):
        if file.is_file() and file.suffix != ".py":
            for number, line in enumerate(file.read_text().splitlines(), 1):
                hits += [f"{file.relative_to(ROOT)}:{number}: {m!r}" for m in NAMED.findall(line) if m in names]
    assert not hits, "core names first-party plugins (use registry.default_of(kind) or the registry):\n" + "\n".join(hits)


def test_the_name_check_finds_a_planted_default():
    names = {"local", "toy2d"}
    source = '"""Docstring: plugin = "local" is fine."""\nX = {"plugin": "local"}\nY = "toy2d"\nZ = \'plugin = "toy2d"\'\n'
    assert named_plugins(source, "core/x.py", names) == ["core/x.py:2: 'local'", "core/x.py:3: 'toy2d'",
                                                        "core/x.py:4: 'toy2d'"]


def test_default_components_come_from_their_registrations():
    """What core used to name is now a registration's ``default=True``: one default per kind at most."""
    assert registry.default_of("launcher") == "local"
    from core.config import resolve

    exp = resolve({"data": {"plugin": registry.default_of("data")}, "backbone": {"plugin": registry.default_of("backbone")},
                   "objective": {"plugin": registry.default_of("objective")}})
    assert exp.components["launcher"]["plugin"] == registry.default_of("launcher")
    assert "solver" not in exp.components  # only DEFAULTED_SECTIONS are filled in
