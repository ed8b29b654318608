"""``flowforge new-plugin``: the template generates, installs, registers and passes its own tests, for every kind.

The packages are installed once per session into a temporary ``--target``
directory (``pip install --no-deps --no-build-isolation``, all kinds in one pip
call) and used from subprocesses with that directory on PYTHONPATH, exactly
as an installed third-party distribution is: found through its entry point.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import registry
from core.cli import main as cli
from core.commands import new_plugin

ROOT = Path(__file__).resolve().parents[2]
KINDS = list(new_plugin.KINDS)


def dist_name(kind: str) -> str:
    return f"fftest-{kind}"


def component_name(kind: str) -> str:
    return f"fftest_{kind}"


def subprocess_env(*paths: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != registry.ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """Every kind generated with the CLI and installed (one pip call) into a target directory."""
    root = tmp_path_factory.mktemp("new-plugin")
    for kind in KINDS:
        assert cli(["new-plugin", dist_name(kind), "--kind", kind, "--component", component_name(kind),
                    "--dir", str(root / "src")]) == 0
    packages = [root / "src" / dist_name(kind) for kind in KINDS]
    target = root / "target"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "--no-input", "-q", "--target", str(target),
                           *map(str, packages)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, target, packages


def test_render_writes_a_complete_package_for_every_kind():
    for kind in KINDS:
        files = new_plugin.render("flowforge-my-thing", kind)
        assert set(files) == {"pyproject.toml", "README.md", "src/flowforge_my_thing/__init__.py",
                              f"src/flowforge_my_thing/{kind}.py", "tests/test_flowforge_my_thing.py",
                              "experiments/my_thing.toml"}
        entry_point = '[project.entry-points."flowforge.plugins"]\nflowforge_my_thing = "flowforge_my_thing"'
        assert entry_point in files["pyproject.toml"]
        hooks = files["src/flowforge_my_thing/__init__.py"]
        assert f"FLOWFORGE_API = {registry.API_VERSION}" in hooks
        assert f'register(\n        "{kind}",\n        "my_thing",\n        "flowforge_my_thing.{kind}:make_my_thing",' in hooks
        for path, text in files.items():
            assert "{{" not in text, (kind, path)
            if path.endswith(".py"):
                ast.parse(text, filename=path)
        if kind == "metric":
            assert '[[metrics]]\nplugin = "my_thing"' in files["experiments/my_thing.toml"]
        else:
            assert f'[{kind}]\nplugin = "my_thing"' in files["experiments/my_thing.toml"]


def test_hook_module_imports_nothing_heavy():
    """The generated hook module only imports `registry` (factories are "module:attr" strings)."""
    for kind in KINDS:
        tree = ast.parse(new_plugin.render("flowforge-light", kind)["src/flowforge_light/__init__.py"])
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert imported == {"registry"}, (kind, imported)


def test_names_are_normalised_and_validated():
    n = new_plugin.names("Flowforge_Poly.Sched")
    assert (n.dist, n.package, n.component, n.class_name) == ("flowforge-poly-sched", "flowforge_poly_sched",
                                                              "poly_sched", "PolySched")
    assert new_plugin.names("ff-x", component="warp").component == "warp"
    for bad in ("1abc", "-x", "core", "json", "a b"):
        with pytest.raises(registry.ConfigError):
            new_plugin.names(bad)
    with pytest.raises(registry.ConfigError, match="--component"):
        new_plugin.names("flowforge-ok", component="Not-Valid")


def test_cli_errors_exit_2_without_a_traceback(tmp_path, capsys):
    assert cli(["new-plugin", "flowforge-taken", "--kind", "solver", "--component", "ode", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "solver 'ode' is already provided by distribution 'flowforge'" in err and "--component" in err
    assert cli(["new-plugin", "9lives", "--dir", str(tmp_path)]) == 2
    assert "invalid package name" in capsys.readouterr().err
    assert cli(["new-plugin", "flowforge-twice", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pip install -e ." in out and "tests/test_flowforge_twice.py" in out
    assert cli(["new-plugin", "flowforge-twice", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["new-plugin", "flowforge-twice", "--dir", str(tmp_path), "--force"]) == 0


def test_installed_packages_are_listed_by_flowforge_plugins(generated):
    _, target, _ = generated
    proc = subprocess.run([sys.executable, "-m", "core.cli", "plugins", "--json"], cwd=ROOT, env=subprocess_env(target),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    infos = {p["distribution"]: p for p in json.loads(proc.stdout)}
    for kind in KINDS:
        info = infos[dist_name(kind)]
        assert info["error"] is None and info["version"] == "0.1.0"
        assert info["components"] == [[kind, component_name(kind)]]
    options = subprocess.run([sys.executable, "-m", "core.cli", "plugins", "--options", component_name("scheduler")],
                             cwd=ROOT, env=subprocess_env(target), capture_output=True, text=True, timeout=300)
    assert "exponent: a number = 2.0" in options.stdout and "n in alpha_t = t^n" in options.stdout


def test_generated_packages_pass_their_own_tests(generated):
    """Each package's tests: registration, the conformance kit of its kind, and a short run of its experiment."""
    root, target, packages = generated
    tests = [str(p / "tests") for p in packages]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
                           "--rootdir", str(root),
                           "-o", "addopts=", *tests], cwd=root, env=subprocess_env(target), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    import re

    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 3 * len(KINDS), proc.stdout[-2000:]  # registered, kit, experiment
    assert not re.search(r"\d+ (failed|skipped|error)", proc.stdout), proc.stdout[-2000:]
