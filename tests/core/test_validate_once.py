"""Validate once: an experiment is resolved (structured) once per process per run, and the workers
receive the structured experiment, not a dict to validate again.

The counts are taken by wrapping `core.config.resolve` and the two structuring functions
(`registry.structure`, used for the core sections, and the registry manager's `structure`, used
for every component section).
"""

from __future__ import annotations

import collections
import pickle

import pytest

import registry
import registry.manager
from core import config
from core.build import build_components
from core.config import Experiment
from core.interfaces import Launcher

TINY = {
    "experiment": {"name": "once", "seed": 3},
    "data": {"plugin": "toy2d", "dataset": "moons"},
    "backbone": {"plugin": "mlp", "hidden": 16, "depth": 1},
    "scheduler": {"plugin": "cond_ot"},
    "path": {"plugin": "affine"},
    "objective": {"plugin": "velocity_mse"},
    "solver": {"plugin": "ode", "method": "euler", "steps": 2},
    "trainer": {"steps": 3, "batch_size": 16, "log_every": 1, "progress": "off"},
    "eval": {"num_samples": 32, "batch_size": 32, "num_pictures": 0, "untrained": False, "floor": False},
    "metrics": [{"plugin": "energy_distance"}],
}


def write(tmp_path, exp: dict) -> str:
    import tomli_w

    path = tmp_path / "once.toml"
    path.write_text(tomli_w.dumps(exp))
    return str(path)


@pytest.fixture
def counts(monkeypatch):
    """How often resolve ran, and how often each config class was structured."""
    seen = {"resolve": 0, "structured": collections.Counter()}
    resolve, structure_core, structure_component = config.resolve, registry.structure, registry.manager.structure

    def counting_resolve(*args, **kwargs):
        seen["resolve"] += 1
        return resolve(*args, **kwargs)

    def counting(original):
        def wrapper(mapping, cls, *args, **kwargs):
            seen["structured"][cls.__name__] += 1
            return original(mapping, cls, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(config, "resolve", counting_resolve)
    monkeypatch.setattr(registry, "structure", counting(structure_core))
    monkeypatch.setattr(registry.manager, "structure", counting(structure_component))
    return seen


class RecordingLauncher(Launcher):
    """Runs the entry in this process and records what it was handed."""

    received: list = []

    def launch(self, entry, *args, accelerator_kwargs):
        from accelerate import Accelerator

        RecordingLauncher.received.append(args)
        return entry(Accelerator(cpu=True), *args)


class RecordingPlugin:
    @registry.hookimpl
    def flowforge_register(self, register):
        register("launcher", "recording", lambda: RecordingLauncher())


def test_a_run_resolves_once_and_structures_each_section_once(tmp_path, counts):
    from core.run import run

    with registry.temporary_plugin(RecordingPlugin(), name="recording-launcher"):
        summary = run(write(tmp_path, {**TINY, "launcher": {"plugin": "recording"}}), out=tmp_path / "run")
    assert summary["steps"] == 3
    assert counts["resolve"] == 1
    # every section with options, structured exactly once (cond_ot, affine, energy_distance have none)
    sections = [(kind, TINY[kind]["plugin"]) for kind in ("data", "backbone", "objective", "solver")]
    expected = {registry.get(kind, name).config_class().__name__: 1 for kind, name in sections}
    assert dict(counts["structured"]) == {"ExperimentConfig": 1, "TrainerConfig": 1, "EvalConfig": 1, **expected}
    (args,) = RecordingLauncher.received[-1:]
    assert isinstance(args[0], Experiment) and args[0].configs  # the structured experiment, not a dict
    assert not any(isinstance(a, dict) for a in args)


def test_a_worker_builds_from_the_pickled_experiment_without_structuring(counts):
    exp = config.resolve(TINY)
    counts["structured"].clear()
    worker = pickle.loads(pickle.dumps(exp))  # what a spawned or submitted worker receives
    assert worker == exp and worker.configs == exp.configs and worker.configs is not exp.configs
    components = build_components(worker)
    assert components.solver.config.steps == 2 and components.model is not None
    assert not counts["structured"], dict(counts["structured"])


def test_a_config_error_keeps_its_location_and_build_errors_are_located(tmp_path):
    bad = {**TINY, "solver": {"plugin": "ode", "stepz": 2}}
    with pytest.raises(registry.ConfigError, match=r"solver\.stepz") as info:
        config.resolve(bad, file="x.toml")
    assert "x.toml" in str(info.value) and "steps" in str(info.value)


def test_stages_are_each_resolved_once_before_any_runs(tmp_path, counts, monkeypatch):
    import core.run

    ran = []
    monkeypatch.setattr(core.run, "run_config", lambda exp, out, **kwargs: ran.append((exp, out)) or {})
    staged = {**TINY, "stages": [{"name": "a"}, {"name": "b", "set": {"experiment.description": "{previous}"}},
                                 {"name": "c", "set": {"experiment.description": "{previous}"}}]}
    core.run.run(write(tmp_path, staged), out=tmp_path / "staged")
    assert counts["resolve"] == 3 and len(ran) == 3
    assert [exp.experiment.description for exp, _ in ran] == ["", str(tmp_path / "staged" / "0-a"),
                                                              str(tmp_path / "staged" / "1-b")]
