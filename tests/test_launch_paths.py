"""Every launch path on a fresh run directory: torchrun, two "machines" sharing one --out, repeated.

Each run is the real main experiment made small, started as a user would. What must hold on every
try: exit 0 on every process, one summary printed (by global rank 0 only), one config.toml and the
final checkpoint in the shared directory, and the same parameters as the one-process run (the
process-count invariance of tests/test_process_invariance.py, here through the external launchers).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import checkpoint as ckpt
from tests.conftest import RF2D, ROOT, TINY_RF2D

SMALL = [*TINY_RF2D, "trainer.steps=12", "trainer.batch_size=64", "eval.untrained=false",
         "trainer.checkpoint_every=6", "trainer.progress='lines'"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
#: tries per path: 2 in the suite; ``LAUNCH_TRIES=5 python -m pytest tests/test_launch_paths.py`` for the record
TRIES = int(os.environ.get("LAUNCH_TRIES", "2"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(*overrides: str) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


def final_params(out: Path) -> dict[str, torch.Tensor]:
    state = ckpt.load(ckpt.latest(out / "checkpoints"))
    assert state["step"] == 12
    return state["model"]


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one") / "run"
    proc = subprocess.run([sys.executable, "-m", "core.run", str(RF2D), "--out", str(out), *sets(*SMALL)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return final_params(out)


def check_shared_run(out: Path, outputs: list[str], one: dict) -> None:
    assert sum(text.count("done: 12 steps") for text in outputs) == 1, "not exactly one summary:\n" + "\n".join(outputs)
    assert (out / "config.toml").is_file() and (out / "summary.json").is_file()
    assert not list(out.rglob("*.tmp*")), "temporaries left behind"
    assert close(final_params(out), one), "the launched run differs from the one-process run"


@pytest.mark.parametrize("attempt", range(TRIES))
def test_torchrun_two_processes_on_a_fresh_directory(tmp_path, one_process, attempt):
    out = tmp_path / "run"
    cmd = ["torchrun", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "core.run", str(RF2D),
           "--out", str(out), *sets(*SMALL, "launcher.plugin='accelerate'")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_shared_run(out, [proc.stdout], one_process)


@pytest.mark.parametrize("attempt", range(TRIES))
def test_two_machines_sharing_one_out_directory(tmp_path, one_process, attempt):
    """Two launchers (machine_rank 0 and 1, one process each) started together on one --out, as two
    cluster nodes on a shared filesystem would be."""
    out, port = tmp_path / "run", free_port()
    procs = []
    for machine in (1, 0):  # the second machine may well start first
        launcher = (f"launcher={{plugin='accelerate', num_machines=2, machine_rank={machine}, num_processes=1, "
                    f"main_process_ip='127.0.0.1', main_process_port={port}, timeout_s=120}}")
        procs.append(subprocess.Popen([sys.executable, "-m", "core.run", str(RF2D), "--out", str(out),
                                       *sets(*SMALL, launcher)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    check_shared_run(out, [stdout for stdout, _ in results], one_process)
