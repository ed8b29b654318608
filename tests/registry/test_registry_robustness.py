"""Registry loading under broken plugins: raising hooks, raising factories, dangling references, retries."""

from __future__ import annotations

import importlib.metadata as metadata
import types

import pytest

import registry
from registry import PluginError, Registry, hookimpl

from .test_registry import _FakeEntryPoint, make_plugin


def _raising_plugin(name: str) -> types.ModuleType:
    """A plugin whose register hook registers one component and then raises."""
    module = types.ModuleType(name)

    @hookimpl
    def flowforge_register(register):
        register("metric", "half_registered", lambda: None)
        raise RuntimeError("the hook broke")

    module.flowforge_register = flowforge_register
    return module


def _entry_points(monkeypatch, eps):
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: eps if group == registry.ENTRY_POINT_GROUP else [])


def test_a_raising_hook_is_reported_with_its_distribution_and_the_others_load(monkeypatch, capsys):
    eps = [_FakeEntryPoint("bad", "bad_mod", "flowforge-bad", module=_raising_plugin("bad_mod")),
           _FakeEntryPoint("good", "good_mod", "flowforge-good", module=make_plugin("good_mod", [("metric", "goodness")]))]
    _entry_points(monkeypatch, eps)
    reg = Registry()
    assert reg.available("metric") == ["goodness"]  # nothing of the raising plugin is kept
    bad = next(p for p in reg.plugins() if p.name == "bad")
    assert "flowforge-bad" in bad.error and "the hook broke" in bad.error and bad.components == []
    err = capsys.readouterr().err
    assert "flowforge-bad" in err and "Traceback" not in err
    with pytest.raises(registry.ConfigError, match="failed to load: bad"):
        reg.get("metric", "half_registered")


def test_a_duplicate_name_leaves_no_half_loaded_registry_and_loading_is_repeatable(monkeypatch):
    eps = [_FakeEntryPoint("a", "a_mod", "dist-a", module=make_plugin("a_mod", [("metric", "twin"), ("metric", "a_only")])),
           _FakeEntryPoint("b", "b_mod", "dist-b", module=make_plugin("b_mod", [("metric", "twin"), ("metric", "b_only")]))]
    _entry_points(monkeypatch, eps)
    reg = Registry()
    for _ in range(2):  # a second load (after the error was caught) fails the same way: never half-loaded
        with pytest.raises(PluginError) as err:
            reg.load()
        assert "dist-a" in str(err.value) and "dist-b" in str(err.value)
        assert not reg._loaded
        assert sorted(reg._components["metric"]) == ["a_only", "twin"]  # plugin b: all or nothing
    _entry_points(monkeypatch, eps[:1] + [_FakeEntryPoint("c", "c_mod", "dist-c", module=make_plugin("c_mod", [("metric", "c1")]))])
    reg.load()  # the conflict resolved (b uninstalled): loading completes
    assert reg._loaded and reg.available("metric") == ["a_only", "c1", "twin"]


def _plugin_with(name: str, factory) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def flowforge_register(register):
        register("metric", "odd", factory)

    module.flowforge_register = flowforge_register
    return module


@pytest.mark.parametrize("factory, words", [
    ("flowforge_missing_module_xyz:make", ["ModuleNotFoundError", "flowforge_missing_module_xyz"]),
    ("registry:no_such_factory", ["AttributeError", "no_such_factory"]),
    (lambda: 1 / 0, ["failed to build", "ZeroDivisionError"]),
])
def test_dangling_references_and_raising_factories_name_the_distribution(factory, words):
    reg = Registry()
    reg._loaded = True
    reg.add_plugin(_plugin_with("odd_mod", factory), name="odd", distribution="flowforge-odd")
    with pytest.raises(PluginError) as err:
        reg.build("metric", {"plugin": "odd"})
    text = str(err.value)
    assert "flowforge-odd" in text and "metric 'odd'" in text
    assert all(w in text for w in words), text


def test_a_raising_factory_exits_2_without_traceback(tmp_path, capsys):
    """Through the runner: a backbone factory that raises is a clear error naming the distribution."""
    from core import run

    module = _plugin_with("odd_mod", lambda: None)

    def broken_backbone(config=None, spec=None):
        raise RuntimeError("shape arithmetic went wrong")

    @hookimpl
    def flowforge_register(register):
        register("backbone", "broken_net", broken_backbone)

    module.flowforge_register = flowforge_register
    file = tmp_path / "x.toml"
    file.write_text('[data]\nplugin = "toy2d"\n[backbone]\nplugin = "broken_net"\n[scheduler]\nplugin = "cond_ot"\n'
                    '[path]\nplugin = "affine"\n[objective]\nplugin = "velocity_mse"\n[trainer]\nsteps = 1\n'
                    '[launcher]\nplugin = "local"\ndevice = "cpu"\n')
    with registry.temporary_plugin(module, name="broken", distribution="flowforge-brokennet"):
        status = run.main([str(file), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "flowforge-brokennet" in err and "shape arithmetic" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # the build error left nothing behind
