"""Loggers ``wandb`` (Weights & Biases) and ``mlflow``, through accelerate's experiment trackers.

`accelerate.tracking.WandBTracker` and `accelerate.tracking.MLflowTracker` make the calls; a
`TrackerLogger` drives one through the `core.interfaces.Logger` contract:

- built: ``tracker.start()`` opens the run (``wandb.init(project=..., entity=..., name=..., mode=...,
  dir=...)``; MLflow: the experiment found by name or created, then ``mlflow.start_run(...)``) and
  ``tracker.store_init_configuration(config)`` stores the resolved experiment (what config.toml
  holds): W&B as the nested run config (``wandb.config.update``), MLflow as params with dotted keys
  (``trainer.lr``, ``metrics.0.plugin``: `mlflow_params`);
- ``log(step, values)``: the record's int and float values (`plugins.launchers.loggers.numbers`) at
  ``step`` (``run.log(values, step=step)`` / ``mlflow.log_metrics(values, step=step)``);
- ``close()``: ``run.finish()`` / ``mlflow.end_run()``.

By default nothing is written outside the run directory: W&B runs offline into ``RUN_DIR/wandb/``
(``wandb sync`` uploads it later); MLflow's store is the SQLite file ``RUN_DIR/mlflow/mlflow.db``, its
artifacts ``RUN_DIR/mlflow/artifacts/``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from core.interfaces import Logger
from core.runs import flatten

from .loggers import numbers, require


@attrs.define
class WandbConfig:
    """Options of the W&B logger (arguments of ``wandb.init``).

    Attributes:
        project: the W&B project the run goes to.
        entity: the user or team owning the project ("" = the account's default entity).
        name: the run's display name ("" = the run directory's name).
        mode: "offline" writes only under `dir` (upload later with ``wandb sync``); "online" also
            streams to the W&B server (after ``wandb login``).
        dir: the folder wandb writes its ``wandb/`` folder into, relative to the run directory (or absolute).
    """

    project: str = "flowforge"
    entity: str = ""
    name: str = ""
    mode: Literal["offline", "online"] = "offline"
    dir: str = "."


@attrs.define
class MlflowConfig:
    """Options of the MLflow logger.

    Attributes:
        tracking_uri: the tracking store or server (e.g. "http://host:5000"); "" = a SQLite store in
            the run directory, ``RUN_DIR/mlflow/mlflow.db``, with artifacts in ``RUN_DIR/mlflow/artifacts``.
        experiment_name: the MLflow experiment, created when missing ("" = the ``[experiment]`` name);
            the environment variable MLFLOW_EXPERIMENT_NAME, when set, wins.
        run_name: the MLflow run's name ("" = the run directory's name).
    """

    tracking_uri: str = ""
    experiment_name: str = ""
    run_name: str = ""


class TrackerLogger(Logger):
    """A `core.interfaces.Logger` over an accelerate tracker: started and given the configuration when
    built, then every record's numbers at its step, finished on close."""

    def __init__(self, tracker: Any, configuration: Mapping[str, Any]):
        from accelerate import PartialState

        PartialState()  # the trackers report through accelerate's logger, which needs the process state
        self.tracker = tracker
        tracker.start()
        try:
            tracker.store_init_configuration(dict(configuration))
        except BaseException:
            tracker.finish()
            raise

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        metrics = numbers(values)
        if metrics:
            self.tracker.log(metrics, step=step)

    def close(self) -> None:
        self.tracker.finish()


def mlflow_params(experiment: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration as MLflow params: `core.runs.flatten`'s dotted keys with list indices as
    ``.i`` (``metrics[0].plugin`` -> ``metrics.0.plugin``: MLflow keys allow no brackets)."""
    return {re.sub(r"\[(\d+)\]", r".\1", key): value for key, value in flatten(experiment).items()}


def make_wandb(config: WandbConfig, run_dir: Path, experiment: Mapping[str, Any] | None = None) -> TrackerLogger:
    """Logger factory for ``plugin = "wandb"``."""
    require("wandb", "wandb", "wandb")
    from accelerate.tracking import WandBTracker

    folder = Path(run_dir) / config.dir
    folder.mkdir(parents=True, exist_ok=True)
    tracker = WandBTracker(config.project, entity=config.entity or None, name=config.name or Path(run_dir).name,
                           mode=config.mode, dir=str(folder))
    return TrackerLogger(tracker, experiment or {})


def make_mlflow(config: MlflowConfig, run_dir: Path, experiment: Mapping[str, Any] | None = None) -> TrackerLogger:
    """Logger factory for ``plugin = "mlflow"``."""
    mlflow = require("mlflow", "mlflow", "mlflow")
    from accelerate.tracking import MLflowTracker

    experiment = experiment or {}
    uri, artifacts = config.tracking_uri, None
    if not uri:
        store = (Path(run_dir) / "mlflow").resolve()
        store.mkdir(parents=True, exist_ok=True)
        uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    name = config.experiment_name or experiment.get("experiment", {}).get("name", "flowforge")
    tracker = MLflowTracker(experiment_name=name, logging_dir=artifacts,
                            run_name=config.run_name or Path(run_dir).name)
    return TrackerLogger(tracker, mlflow_params(experiment))
