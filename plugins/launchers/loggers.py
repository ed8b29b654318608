"""First-party loggers (``[[loggers]]``): ``tensorboard`` (``wandb`` and ``mlflow``: `plugins.launchers.trackers`).

metrics.jsonl is always written; a logger receives the same records (`core.interfaces.Logger`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from core.interfaces import Logger
from registry import ConfigError


@attrs.define
class TensorBoardConfig:
    """Options of the TensorBoard logger.

    Attributes:
        logdir: the event-file folder, relative to the run directory (or absolute).
    """

    logdir: str = "tensorboard"


def require(module: str, package: str, plugin: str) -> Any:
    """Import `module` for the logger `plugin`; ConfigError naming ``pip install package`` when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"the {plugin} logger needs the {package} package: pip install {package} "
                          f"(or pip install 'flowforge[{package}]'), or remove it from [[loggers]]",
                          ("plugin",)) from None


def numbers(values: Mapping[str, Any]) -> dict[str, int | float]:
    """The int and float values of a record (no bools, None, strings), in the record's order."""
    return {key: value for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardLogger(Logger):
    """Every number of every record as a scalar of ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, config: TensorBoardConfig, run_dir: Path):
        summary_writer = require("torch.utils.tensorboard", "tensorboard", "tensorboard").SummaryWriter
        self.writer = summary_writer(str(Path(run_dir) / config.logdir))

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        for key, value in numbers(values).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        close = getattr(self.writer, "close", None)
        if close is not None:
            close()


def make_tensorboard(config: TensorBoardConfig, run_dir: Path) -> TensorBoardLogger:
    """Logger factory for ``plugin = "tensorboard"``."""
    return TensorBoardLogger(config, run_dir)
