"""The ``wandb`` and ``mlflow`` loggers (`plugins.launchers.trackers`), against recording fakes.

Neither package is a dependency: a fake ``wandb`` / ``mlflow`` module put in ``sys.modules``
records every call accelerate's trackers make, and the tests assert those calls exactly (the
``init`` / ``start_run`` arguments, the config, each record's numbers at its step, the finish).
The last test trains a tiny experiment through the runner with ``[[loggers]] plugin = "wandb"``
and checks the fake saw config.toml and every number of metrics.jsonl.
"""

from __future__ import annotations

import json
import sys
import tomllib
import types
from pathlib import Path

import accelerate.tracking  # noqa: F401 - it looks for installed trackers once, on import: before any fake
import pytest

import registry
from core.rundir import RunDir
from registry import ConfigError

from ...conftest import TINY_RF2D

ROOT = Path(__file__).resolve().parents[3]
EXPERIMENT = {"experiment": {"name": "toy", "seed": 3},
              "trainer": {"lr": 0.001, "betas": [0.9, 0.99]},
              "metrics": [{"plugin": "frechet_distance"}]}
RECORDS = [{"step": 5, "loss": 0.5, "loss_bin/0": 0.7, "note": "text", "flag": True, "grad_norm": None},
           {"step": 10, "eval/frechet_distance": 3.0, "steps_per_s": 12}]


def fake_wandb(monkeypatch) -> list:
    """Install a fake ``wandb``; return the list its calls are appended to."""
    calls: list = []

    class Run:
        def log(self, values, step=None):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    class Config:
        def update(self, values, allow_val_change=False):
            calls.append(("config.update", json.loads(json.dumps(values)), allow_val_change))

    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    module.config = Config()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def fake_mlflow(monkeypatch, existing: list | None = None, per_batch: int = 100) -> list:
    """Install a fake ``mlflow`` (experiments `existing` found by name); return its call list."""
    calls: list = []
    module = types.ModuleType("mlflow")
    module.utils = types.SimpleNamespace(validation=types.SimpleNamespace(
        MAX_PARAM_VAL_LENGTH=6000, MAX_PARAMS_TAGS_PER_BATCH=per_batch))
    module.set_tracking_uri = lambda uri: calls.append(("set_tracking_uri", uri))
    module.search_experiments = lambda **kw: calls.append(("search_experiments", kw)) or list(existing or [])
    module.create_experiment = lambda **kw: calls.append(("create_experiment", kw)) or "7"
    module.start_run = lambda **kw: calls.append(("start_run", kw)) or types.SimpleNamespace(info=None)
    module.log_params = lambda params: calls.append(("log_params", dict(params)))
    module.log_metrics = lambda metrics, step=None: calls.append(("log_metrics", dict(metrics), step))
    module.end_run = lambda: calls.append(("end_run",))
    monkeypatch.setitem(sys.modules, "mlflow", module)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TAGS", raising=False)
    return calls


def log_records(tmp_path: Path, mapping: dict) -> RunDir:
    """Build the logger `mapping` on a RunDir in tmp_path, log `RECORDS`, close it."""
    rd = RunDir(tmp_path)
    rd.loggers = [registry.build("logger", mapping, run_dir=tmp_path, experiment=EXPERIMENT)]
    for record in RECORDS:
        rd.log(dict(record))
    rd.close_loggers()
    return rd


# --------------------------------------------------------------------------- wandb
def test_wandb_defaults_are_an_offline_run_in_the_run_directory(monkeypatch, tmp_path):
    calls = fake_wandb(monkeypatch)
    log_records(tmp_path, {"plugin": "wandb"})
    assert calls == [
        ("init", {"project": "flowforge", "entity": None, "name": tmp_path.name, "mode": "offline",
                  "dir": str(tmp_path)}),
        ("config.update", EXPERIMENT, True),
        ("log", {"loss": 0.5, "loss_bin/0": 0.7}, 5),  # no strings, bools or None
        ("log", {"eval/frechet_distance": 3.0, "steps_per_s": 12}, 10),
        ("finish",),
    ]


def test_wandb_options_reach_init(monkeypatch, tmp_path):
    calls = fake_wandb(monkeypatch)
    log_records(tmp_path, {"plugin": "wandb", "project": "ff", "entity": "lab", "name": "first",
                           "mode": "online", "dir": "trackers"})
    assert calls[0] == ("init", {"project": "ff", "entity": "lab", "name": "first", "mode": "online",
                                 "dir": str(tmp_path / "trackers")})
    assert (tmp_path / "trackers").is_dir() and calls[-1] == ("finish",)


def test_wandb_bad_mode_and_missing_package_are_config_errors(monkeypatch, tmp_path):
    fake_wandb(monkeypatch)
    with pytest.raises(ConfigError, match="mode"):
        registry.build("logger", {"plugin": "wandb", "mode": "onlin"}, run_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails like a missing package
    with pytest.raises(ConfigError, match=r"pip install wandb \(or pip install 'flowforge\[wandb\]'\)"):
        registry.build("logger", {"plugin": "wandb"}, run_dir=tmp_path)


# --------------------------------------------------------------------------- mlflow
def test_mlflow_defaults_store_everything_in_the_run_directory(monkeypatch, tmp_path):
    calls = fake_mlflow(monkeypatch)
    log_records(tmp_path, {"plugin": "mlflow"})
    store = (tmp_path / "mlflow").resolve()
    assert calls == [
        ("set_tracking_uri", f"sqlite:///{store}/mlflow.db"),
        ("search_experiments", {"filter_string": "name = 'toy'"}),
        ("create_experiment", {"name": "toy", "artifact_location": (store / "artifacts").as_uri(), "tags": None}),
        ("start_run", {"run_id": None, "experiment_id": "7", "run_name": tmp_path.name, "nested": False,
                       "tags": None, "description": None}),
        ("log_params", {"experiment.name": "toy", "experiment.seed": 3, "trainer.lr": 0.001,
                        "trainer.betas": [0.9, 0.99], "metrics.0.plugin": "frechet_distance"}),
        ("log_metrics", {"loss": 0.5, "loss_bin/0": 0.7}, 5),
        ("log_metrics", {"eval/frechet_distance": 3.0, "steps_per_s": 12}, 10),
        ("end_run",),
    ]
    assert store.is_dir()


def test_mlflow_options_an_existing_experiment_and_param_batches(monkeypatch, tmp_path):
    calls = fake_mlflow(monkeypatch, existing=[types.SimpleNamespace(experiment_id="3")], per_batch=2)
    log_records(tmp_path, {"plugin": "mlflow", "tracking_uri": "http://tracker:5000",
                           "experiment_name": "sweep", "run_name": "lr-1e-3"})
    assert calls[:3] == [
        ("set_tracking_uri", "http://tracker:5000"),
        ("search_experiments", {"filter_string": "name = 'sweep'"}),  # found: not created again
        ("start_run", {"run_id": None, "experiment_id": "3", "run_name": "lr-1e-3", "nested": False,
                       "tags": None, "description": None}),
    ]
    batches = [c[1] for c in calls if c[0] == "log_params"]  # MLflow's cap on params per call
    assert [len(b) for b in batches] == [2, 2, 1]
    assert {k: v for b in batches for k, v in b.items()}["trainer.lr"] == 0.001
    assert calls[-1] == ("end_run",) and not (tmp_path / "mlflow").exists()


def test_mlflow_missing_package_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"pip install mlflow \(or pip install 'flowforge\[mlflow\]'\)"):
        registry.build("logger", {"plugin": "mlflow"}, run_dir=tmp_path)


# --------------------------------------------------------------------------- a run with [[loggers]] wandb
def test_a_run_logs_its_config_and_every_number_to_wandb(monkeypatch, tmp_path):
    from core.runs import load_experiment, train

    from plugins.launchers.loggers import numbers

    calls = fake_wandb(monkeypatch)
    file = tmp_path / "rf.toml"
    file.write_text((ROOT / "experiments" / "rectified_flow_2d.toml").read_text()
                    + '\n[[loggers]]\nplugin = "wandb"\nproject = "ff-test"\n')
    out = tmp_path / "run"
    train(file, [*TINY_RF2D, "eval.every=10", "trainer.checkpoint_every=10"], out)
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["loggers"] == [{"plugin": "wandb", "project": "ff-test", "entity": "", "name": "",
                                  "mode": "offline", "dir": "."}]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    numbers_of = [numbers({k: v for k, v in r.items() if k != "step"}) for r in records]
    expected = [("log", values, r["step"]) for r, values in zip(records, numbers_of) if values]
    assert calls[0] == ("init", {"project": "ff-test", "entity": None, "name": "run", "mode": "offline",
                                 "dir": str(out)})
    assert calls[1] == ("config.update", json.loads(json.dumps(load_experiment(out).to_dict())), True)  # resolved
    logged = [c for c in calls if c[0] == "log"]
    assert logged == expected  # every number of every metrics.jsonl record, at its step
    assert [c[2] for c in logged if "loss" in c[1]] == [5, 10, 15, 20]
    assert any("eval/" in key for c in logged for key in c[1])
    assert calls[-1] == ("finish",) and calls.count(("finish",)) == 1
