"""The example external package examples/flowforge-sde: it registers, is built from TOML, and passes the kit.

When CI (or the developer) installed it (``pip install -e examples/flowforge-sde``)
the tests use that installation; otherwise the package is installed once per
session into a temporary ``--target`` directory that the subprocesses put on
PYTHONPATH, so this file never depends on the order of CI's install steps.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flowforge-sde"
DIST = "flowforge-sde"


@pytest.fixture(scope="session")
def example_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses in which flowforge-sde is importable and its entry point visible."""
    env = {k: v for k, v in os.environ.items() if k != registry.ENV_VAR}
    env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(ROOT)]
    try:
        metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        work = tmp_path_factory.mktemp("flowforge-sde")
        source = work / "src"
        shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        target = work / "target"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                               "--disable-pip-version-check", "--no-input", "-q", "--target", str(target), str(source)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        paths.insert(0, str(target))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return env


def run(args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_it_registers_through_its_entry_point(example_env):
    proc = run(["-m", "core.cli", "plugins", "--json"], example_env)
    assert proc.returncode == 0, proc.stderr
    info = next(p for p in json.loads(proc.stdout) if p["distribution"] == DIST)
    assert info["error"] is None and info["components"] == [["solver", "euler_maruyama"]]
    options = run(["-m", "core.cli", "plugins", "--options", "euler_maruyama"], example_env)
    assert options.returncode == 0, options.stderr
    for line in ("distribution flowforge-sde", "steps: an integer = 100", "scale: a number = 1.0", "denoise_last: true or false = True",
                 "strength of the noise; 0 is the probability-flow ODE"):
        assert line in options.stdout, options.stdout
    diffusion = next(line for line in options.stdout.splitlines() if line.strip().startswith("diffusion:"))
    assert "'sigma'" in diffusion and "'constant'" in diffusion, diffusion


def test_its_experiment_runs_from_toml(example_env, tmp_path):
    """`python -m core.run examples/flowforge-sde/experiments/sde_2d.toml`, shortened."""
    tiny = ["trainer.steps=10", "trainer.batch_size=64", "trainer.log_every=5", "trainer.warmup_steps=0",
            "trainer.checkpoint_every=0", "backbone.hidden=32", "backbone.depth=2", "eval.num_samples=128",
            "eval.num_pictures=128", "eval.batch_size=128", "solver.steps=8"]
    args = ["-m", "core.run", str(EXAMPLE / "experiments" / "sde_2d.toml"), "--out", str(tmp_path / "run")]
    proc = run(args + [a for o in tiny for a in ("--set", o)], example_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["nfe"] == 8  # one model evaluation per Euler-Maruyama step
    assert summary["metrics"] and all(math.isfinite(v) for v in summary["metrics"].values())
    assert 'plugin = "euler_maruyama"' in (tmp_path / "run" / "config.toml").read_text()


def test_its_own_tests_pass_including_the_conformance_kit(example_env, tmp_path):
    """examples/flowforge-sde/tests: the solver kit at g = 0, the score identity, the marginals, its experiment."""
    # (its experiment-file test is what test_its_experiment_runs_from_toml does through the CLI)
    proc = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark", "-o", "addopts=",
                "--rootdir", str(EXAMPLE),
                "-k", "not test_experiment_file_runs", str(EXAMPLE / "tests")], example_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
