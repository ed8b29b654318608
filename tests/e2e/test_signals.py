"""Kill tests: SIGTERM/SIGINT stop a run at a step boundary with a checkpoint, and the resumed run ends
exactly where an uninterrupted one does; workers die with their launcher.

Every run here is the real main experiment (experiments/rectified_flow_2d.toml) made small, started as a
real ``python -m core.run`` process; the signal is sent while it trains (after metrics.jsonl shows a
logged step), as Slurm, Kubernetes or a terminal would send it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import checkpoint as ckpt
from tests.conftest import RF2D, ROOT

# Long enough that a signal sent after the first logged step lands mid-training, short enough to finish.
LONG = [
    "trainer.steps=1500", "trainer.batch_size=64", "trainer.log_every=5", "trainer.warmup_steps=0",
    "trainer.checkpoint_every=1000", "backbone.hidden=32", "backbone.depth=2", "eval.num_samples=64",
    "eval.num_pictures=64", "eval.batch_size=64", "solver.steps=4",
]
TWO = ["launcher={plugin='accelerate', num_processes=2, threads_per_process=1}"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def start(out: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "core.run", str(RF2D), "--out", str(out)]
    args += ["--resume" if resume else "--overwrite", *(a for kv in (*LONG, *extra) for a in ("--set", kv))]
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_step(out: Path) -> int:
    """The last step written to metrics.jsonl (0 before the first)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def wait_until_training(proc: subprocess.Popen, out: Path, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = logged_step(out)
        if step >= 10:
            return step
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it was signalled:\n{proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run did not start training in time")


def final_state(out: Path) -> dict:
    return ckpt.load(ckpt.latest(out / "checkpoints"))


def children(pid: int) -> list[int]:
    """Every descendant pid of `pid` that is alive (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        found += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return [p for p in found if alive(p)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def assert_equal_states(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        if part not in a:
            continue
        left, right = a[part], b[part]
        if isinstance(left, dict) and "shadow" in left:  # EMA state holds its own tensors
            left, right = left["shadow"], right["shadow"]
        for key, value in left.items():
            if isinstance(value, torch.Tensor):
                if atol:
                    assert torch.allclose(value, right[key], atol=atol, rtol=0), f"{part}.{key}"
                else:
                    assert torch.equal(value, right[key]), f"{part}.{key} differs after stop + resume"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("signals") / "whole"
    proc = start(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return final_state(out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_at_the_step_boundary_and_resume_is_exact(tmp_path, uninterrupted, signum):
    out = tmp_path / "run"
    proc = start(out)
    seen = wait_until_training(proc, out)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"received {name}" in err and f"stopped by {name} after step" in err and "--resume" in err, err
    assert "Traceback" not in err, err
    stopped_at = int(err.split("after step ")[1].split(";")[0])
    assert seen <= stopped_at < 1500
    saved = ckpt.latest(out / "checkpoints")
    assert ckpt.load(saved)["step"] == stopped_at, "the checkpoint is not the step the run stopped after"
    assert not list((out / "checkpoints").glob("*.tmp*")), "a temporary file was left behind"

    proc = start(out, resume=True)
    printed, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from step {stopped_at}" in printed, printed
    assert_equal_states(final_state(out), uninterrupted)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the resume"


def start_two_workers(out: Path) -> tuple[subprocess.Popen, list[int]]:
    """A 2-process run under the accelerate launcher, once it trains; (launcher, worker pids)."""
    proc = start(out, *TWO)
    wait_until_training(proc, out)
    workers = children(proc.pid)
    assert len(workers) >= 2, workers
    return proc, workers


def test_sigterm_to_the_launcher_of_two_workers_checkpoints_once_and_leaves_no_worker(tmp_path):
    out = tmp_path / "two"
    proc, workers = start_two_workers(out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err, err
    stopped_at = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert ckpt.load(ckpt.latest(out / "checkpoints"))["step"] == stopped_at
    time.sleep(0.5)
    assert not [p for p in workers if alive(p)], "a worker outlived its launcher"

    proc = start(out, *TWO, resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert ckpt.load(ckpt.latest(out / "checkpoints"))["step"] == 1500


def test_workers_die_when_their_launcher_is_killed(tmp_path):
    out = tmp_path / "orphans"
    proc, workers = start_two_workers(out)
    proc.kill()  # SIGKILL: the launcher cannot forward anything
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [p for p in workers if alive(p)]:
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "workers kept training after their launcher was killed"
    size = (out / "metrics.jsonl").stat().st_size
    time.sleep(1.0)
    assert (out / "metrics.jsonl").stat().st_size == size, "something still writes into the run directory"
