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
