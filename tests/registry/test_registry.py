"""The plugin registry: lookup, building, errors, temporary plugins, loading from entry points."""

from __future__ import annotations

import importlib.metadata as metadata
import sys
import types

import attrs
import pytest

import registry
from registry import ConfigError, PluginError, Registry, hookimpl


def make_plugin(name: str, components: list[tuple[str, str]], api: int | None = None) -> types.ModuleType:
    """A throwaway plugin module registering `components` (factories return their config)."""
    module = types.ModuleType(name)

    @attrs.define
    class Options:
        """Options.

        Attributes:
            size: how big.
        """

        size: int = 3

    def factory(config, spec=None):
        return ("built", config, spec)

    @hookimpl
    def flowforge_register(register):
        for kind, comp in components:
            register(kind, comp, factory, Options)

    module.flowforge_register = flowforge_register
    if api is not None:
        module.FLOWFORGE_API = api
    return module


def test_first_party_components_are_available():
    assert "toy2d" in registry.available("data")
    assert "ode" in registry.available("solver")
    assert "cond_ot" in registry.available("scheduler")
    dists = {p.distribution for p in registry.plugins()}
    assert "flowforge" in dists


def test_build_structures_options_and_injects_context_by_name():
    with registry.temporary_plugin(make_plugin("tmp_build", [("widget", "gizmo")])):
        kind, config, spec = registry.build("widget", {"plugin": "gizmo", "size": 7}, spec="SPEC", unused=1)
        assert (kind, config.size, spec) == ("built", 7, "SPEC")
        assert registry.resolved("widget", {"plugin": "gizmo"}) == {"plugin": "gizmo", "size": 3}
    assert "gizmo" not in registry.available("widget")


def test_unknown_name_lists_installed_and_closest_match():
    with pytest.raises(ConfigError) as err:
        registry.build("solver", {"plugin": "oed"})
    msg = str(err.value)
    assert "unknown solver plugin 'oed'" in msg and 'did you mean "ode"' in msg and "installed:" in msg


def test_missing_plugin_key_and_unknown_option():
    with pytest.raises(ConfigError, match="missing required key 'plugin'"):
        registry.build("solver", {"method": "euler"})
    with pytest.raises(ConfigError) as err:
        registry.build("solver", {"plugin": "ode", "stesp": 3})
    assert err.value.path == ("stesp",) and 'did you mean "steps"' in str(err.value)


def test_duplicate_names_across_plugins_name_both_distributions():
    reg = Registry()
    reg._loaded = True  # no entry points: only what the test registers
    reg.add_plugin(make_plugin("first", [("scheduler", "twin")]), name="first", distribution="dist-one")
    with pytest.raises(PluginError) as err:
        reg.add_plugin(make_plugin("second", [("scheduler", "twin")]), name="second", distribution="dist-two")
    assert "dist-one" in str(err.value) and "dist-two" in str(err.value)
    assert reg.available("scheduler") == ["twin"]
    assert [p.name for p in reg.plugins()] == ["first"]


def test_incompatible_api_version_is_refused():
    reg = Registry()
    reg._loaded = True
    info = reg.add_plugin(make_plugin("future", [("solver", "warp")], api=registry.API_VERSION + 1),
                          name="future", distribution="flowforge-future")
    assert info.error and "API" in info.error and str(registry.API_VERSION + 1) in info.error
    assert reg.available("solver") == []


class _FakeDist:
    def __init__(self, name):
        self.name, self.version = name, "9.9"


class _FakeEntryPoint:
    def __init__(self, name, value, dist, module=None, error=None):
        self.name, self.value, self.dist, self._module, self._error = name, value, _FakeDist(dist), module, error

    def load(self):
        if self._error:
            raise self._error
        return self._module


def _fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: eps if group == registry.ENTRY_POINT_GROUP else [])


def test_broken_plugin_is_reported_and_the_others_still_load(monkeypatch, capsys):
    good = make_plugin("good_mod", [("metric", "goodness")])
    eps = [_FakeEntryPoint("broken", "broken_mod", "flowforge-broken", error=ImportError("no module named 'nope'")),
           _FakeEntryPoint("good", "good_mod", "flowforge-good", module=good)]
    _fake_entry_points(monkeypatch, eps)
    reg = Registry()
    assert reg.available("metric") == ["goodness"]
    broken = next(p for p in reg.plugins() if p.name == "broken")
    assert broken.distribution == "flowforge-broken" and "nope" in broken.error
    assert "flowforge-broken" in capsys.readouterr().err


def test_environment_variable_selects_third_party_plugins(monkeypatch):
    eps = [_FakeEntryPoint("alpha", "a", "flowforge-alpha", module=make_plugin("a", [("metric", "a1")])),
           _FakeEntryPoint("beta", "b", "flowforge-beta", module=make_plugin("b", [("metric", "b1")])),
           _FakeEntryPoint("home", "h", "flowforge", module=make_plugin("h", [("metric", "h1")]))]
    _fake_entry_points(monkeypatch, eps)
    monkeypatch.setenv(registry.ENV_VAR, "")
    assert Registry().available("metric") == ["h1"]
    monkeypatch.setenv(registry.ENV_VAR, "beta")
    assert Registry().available("metric") == ["b1", "h1"]
    monkeypatch.delenv(registry.ENV_VAR)
    assert Registry().available("metric") == ["a1", "b1", "h1"]


def test_plugins_command_lists_distributions_and_components(capsys):
    from core.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "flowforge 0.1.0" in out and "solver:ode" in out and "data:toy2d" in out


def test_options_command_prints_types_defaults_and_docs(capsys):
    from core.cli import main

    assert main(["plugins", "--options", "solver", "ode"]) == 0
    out = capsys.readouterr().out
    assert "method: one of 'euler', 'midpoint', 'heun', 'rk4'" in out and "= 'midpoint'" in out
    assert "steps: an integer = 20" in out and "euler, midpoint, heun, rk4 (fixed steps)" in out


def test_hook_modules_stay_light():
    """Listing plugins imports no heavy plugin module (factories load lazily)."""
    import subprocess

    code = ("import sys, registry; registry.plugins(); "
            "heavy = [m for m in sys.modules if m.startswith('plugins.') and m.count('.') >= 2]; "
            "print(heavy); assert not heavy, heavy; assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
