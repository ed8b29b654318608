"""First-party loggers (``[[loggers]]``): ``tensorboard``.

metrics.jsonl is always written; a logger receives the same records (`core.interfaces.Logger`).
"""

from __future__ import annotations

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


class TensorBoardLogger(Logger):
    """Every number of every record as a scalar of ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, config: TensorBoardConfig, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("the tensorboard logger needs the tensorboard package: pip install tensorboard "
                              "(or pip install 'flowforge[tensorboard]'), or remove it from [[loggers]]",
                              ("plugin",)) from None
        self.writer = SummaryWriter(str(Path(run_dir) / config.logdir))

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        close = getattr(self.writer, "close", None)
        if close is not None:
            close()


def make_tensorboard(config: TensorBoardConfig, run_dir: Path) -> TensorBoardLogger:
    """Logger factory for ``plugin = "tensorboard"``."""
    return TensorBoardLogger(config, run_dir)
