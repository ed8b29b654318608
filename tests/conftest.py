"""Shared fixtures: small experiment files and a temporary-plugin helper."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each of the `-n 2` workers gets one core: one thread for its own torch and for the processes it starts.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RF2D = ROOT / "experiments" / "rectified_flow_2d.toml"

# Small, fast settings for end-to-end runs of the 2D experiment.
TINY_RF2D = [
    "trainer.steps=20", "trainer.batch_size=64", "trainer.log_every=5", "trainer.warmup_steps=0",
    "backbone.hidden=32", "backbone.depth=2", "eval.num_samples=64", "eval.num_pictures=64",
    "eval.batch_size=64", "solver.steps=4",
]


@pytest.fixture
def tiny_rf2d() -> list[str]:
    """Overrides that make experiments/rectified_flow_2d.toml run in about a second."""
    return list(TINY_RF2D)


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run ``python -m core.run ARGS`` in a subprocess; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def _starts_processes(path: Path) -> bool:
    """Whether a test module launches several processes (torchrun, a launcher of 2 workers)."""
    text = path.read_text()
    return "torchrun" in text or "num_processes" in text or "launchers.slurm" in text


def pytest_collection_modifyitems(config, items):
    """Spread the modules that start several processes evenly over the collection order.

    ``--dist loadfile`` hands whole modules to the two xdist workers in collection order; kept together,
    the multi-process modules ran side by side on both workers (four or more processes on two cores), and
    every test slowed down. Order within a module is unchanged.
    """
    files: dict[Path, list] = {}
    for item in items:
        files.setdefault(Path(str(item.fspath)), []).append(item)
    heavy = [f for f in files if _starts_processes(f)]
    light = [f for f in files if f not in heavy]
    order, step = [], max(1, len(light) // max(1, len(heavy)))
    for i, f in enumerate(heavy):
        order += [f] + light[i * step:(i + 1) * step]
    order += light[len(heavy) * step:]
    items[:] = [item for f in order for item in files[f]]
