"""Versioning of the plugin API: a plugin built for another major version is refused with a clear message.

A plugin module declares ``FLOWFORGE_API = <int>`` (registry.hookspecs.API_VERSION
is what this flowforge provides). A mismatch is refused when the plugin loads,
before any of its components is registered, instead of failing at run time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import registry
from registry import Registry, hookimpl
from registry.hookspecs import API_VERSION

ROOT = Path(__file__).resolve().parents[2]


class FuturePlugin:
    """A plugin object written for a later (or older) plugin API."""

    def __init__(self, api):
        self.FLOWFORGE_API = api

    @hookimpl
    def flowforge_register(self, register):
        register("solver", "warp_drive", lambda: None, None, doc="from the future")


def test_api_version_is_declared():
    assert isinstance(API_VERSION, int) and API_VERSION >= 1
    assert registry.API_VERSION == API_VERSION


def test_mismatched_plugin_is_refused_with_a_clear_message(capsys):
    reg = Registry()
    reg._loaded = True  # no entry points: only the plugin under test
    info = reg.add_plugin(FuturePlugin(99), name="future", distribution="flowforge-future")
    assert info.error is not None
    for words in ("refused", "plugin API 99", f"provides API {API_VERSION}", "flowforge-future"):
        assert words in info.error, (words, info.error)
    assert reg.available("solver") == [] and info.components == []
    assert [p.name for p in reg.plugins()] == ["future"] and reg.plugins()[0].error == info.error
    assert "flowforge-future" in capsys.readouterr().err
    expected = r"unknown solver plugin 'warp_drive'.*failed to load: future \(flowforge-future\)"
    with pytest.raises(registry.ConfigError, match=expected):
        reg.get("solver", "warp_drive")


def test_temporary_plugin_with_another_api_is_not_registered():
    with registry.temporary_plugin(FuturePlugin(99), name="future_tmp", distribution="flowforge-future") as info:
        assert info.error and "99" in info.error
        assert "warp_drive" not in registry.available("solver")
    assert "warp_drive" not in registry.available("solver")
    assert "future_tmp" not in [p.name for p in registry.plugins()]


@pytest.mark.parametrize("api", [API_VERSION, None])
def test_matching_or_undeclared_api_is_accepted(api):
    plugin = FuturePlugin(API_VERSION)
    if api is None:
        del plugin.FLOWFORGE_API  # undeclared: assumed current
    with registry.temporary_plugin(plugin, name="present_api", distribution="flowforge-present") as info:
        assert info.error is None and ("solver", "warp_drive") in info.components
        assert "warp_drive" in registry.available("solver")


def test_installed_plugin_for_another_api_is_refused_by_the_cli(tmp_path):
    """An installed distribution (dist-info with an entry point) declaring FLOWFORGE_API = 99:
    `flowforge plugins` reports it as refused, the others still load, and an experiment naming its
    component fails with status 2 and says which plugin did not load."""
    site = tmp_path / "site"
    (site / "flowforge_future").mkdir(parents=True)
    (site / "flowforge_future" / "__init__.py").write_text(textwrap.dedent("""
        from registry import hookimpl
        FLOWFORGE_API = 99

        @hookimpl
        def flowforge_register(register):
            register("solver", "warp_drive", "flowforge_future:nothing", None)
    """))
    dist = site / "flowforge_future-2.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flowforge-future\nVersion: 2.0.0\n")
    (dist / "entry_points.txt").write_text("[flowforge.plugins]\nflowforge_future = flowforge_future\n")
    env = {k: v for k, v in os.environ.items() if k != registry.ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    listed = subprocess.run([sys.executable, "-m", "core.cli", "plugins"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "flowforge-future 2.0.0" in listed.stdout
    assert f"refused: built for flowforge plugin API 99, this flowforge provides API {API_VERSION}" in listed.stdout
    assert "solver:ode" in listed.stdout  # the others still load

    experiment = tmp_path / "exp.toml"
    experiment.write_text((ROOT / "experiments" / "rectified_flow_2d.toml").read_text()
                          .replace('plugin = "ode"', 'plugin = "warp_drive"'))
    ran = subprocess.run([sys.executable, "-m", "core.run", str(experiment), "--out", str(tmp_path / "run")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2, ran.stderr
    assert "unknown solver plugin 'warp_drive'" in ran.stderr and "flowforge_future (flowforge-future)" in ran.stderr
    assert "Traceback" not in ran.stderr
