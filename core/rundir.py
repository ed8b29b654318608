"""The run directory (DESIGN.md): config.toml, env.json, metrics.jsonl, summary.json,
checkpoints/ and samples/."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from registry import ConfigError


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunDir:
    """Paths and writers of one run's directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.toml"
        self.env = self.root / "env.json"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"

    def has_run(self) -> bool:
        return self.config.exists() or (self.checkpoints.is_dir() and any(self.checkpoints.iterdir()))

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Create the folders; refuse to mix a new run into an old one."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"run directory {self.root} exists and is not a directory")
        if self.has_run() and not resume:
            if not overwrite:
                raise ConfigError(
                    f"run directory {self.root} already holds a run; pass --resume to continue it, "
                    f"--overwrite to replace it, or --out DIR to choose another directory")
            shutil.rmtree(self.root)
        if resume and not self.has_run():
            raise ConfigError(f"--resume: no run to resume in {self.root} (no config.toml or checkpoints)")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.samples.mkdir(parents=True, exist_ok=True)

    def write_config(self, text: str) -> None:
        self.config.write_text(text)

    def write_env(self) -> None:
        """Versions of Python, torch and every flowforge plugin distribution."""
        import torch

        dists: dict[str, str] = {}
        for ep in metadata.entry_points(group="flowforge.plugins"):
            if ep.dist is not None:
                dists[ep.dist.name] = ep.dist.version
        info = {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cpu_count": os.cpu_count(),
            "plugins": dists,
        }
        for name in ("accelerate", "torchmetrics", "pluggy", "attrs", "cattrs", "numpy"):
            try:
                info[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        self.env.write_text(json.dumps(info, indent=2) + "\n")

    #: TensorBoard writer: None until the first log, False when tensorboard is not installed.
    _tensorboard: Any = None

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` to metrics.jsonl; mirror its numbers to ``tensorboard/`` when tensorboard is installed."""
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
            else:
                self._tensorboard = SummaryWriter(str(self.root / "tensorboard"))
        if self._tensorboard:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        os.replace(tmp, self.summary)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
