"""Slurm requeue exercised for real, through submitit's local executor.

A real ``python -m core.run`` of the main experiment (made small) is submitted with the ``slurm``
launcher and ``executor = "local"``. While it trains, its task receives submitit's preemption signal
(``SIGUSR2`` unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise: what Slurm sends before a time-out,
``--signal=USR2@90``, and on preemption when the partition is configured so), as Slurm would deliver it:
to the task process, not to the submitting one. What must follow, with nothing else done by the test:
the trainer finishes the step and checkpoints, the job hands submitit its resumed submission
(``TrainJob.checkpoint`` -> ``resume = True``), submitit's controller restarts the task (exit 144, its
local stand-in for ``scontrol requeue``), the restarted task resumes from that checkpoint, and the run
ends with exactly the parameters, EMA included, of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import submitit

from core import checkpoint as ckpt
from core.signals import StopRequested
from plugins.launchers.slurm import TrainJob
from tests.conftest import RF2D, ROOT
from tests.e2e.test_signals import assert_equal_states, children, wait_until_training

STEPS = 300  # long enough that a signal sent after step 10 lands mid-training
SMALL = [f"trainer.steps={STEPS}", "trainer.batch_size=64", "trainer.log_every=5", "trainer.warmup_steps=0",
         "trainer.checkpoint_every=1000", "backbone.hidden=32", "backbone.depth=2", "eval.num_samples=64",
         "eval.num_pictures=0", "eval.batch_size=64", "solver.steps=4", "eval.untrained=false",
         "eval.floor=false", "trainer.progress='off'"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def start(out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "core.run", str(RF2D), "--out", str(out),
            *(a for kv in (*SMALL, *extra) for a in ("--set", kv))]
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def submitit_task(pid: int) -> int:
    """The pid of the job's task (``python -m submitit.core._submit``) among the descendants of `pid`."""
    tasks = [p for p in children(pid) if "submitit.core._submit" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(tasks) == 1, f"expected one submitit task under pid {pid}, found {tasks}"
    return tasks[0]


def test_a_preempted_submitit_job_checkpoints_requeues_and_resumes_exactly(tmp_path):
    reference = start(tmp_path / "whole")  # the uninterrupted run, alongside
    logs = tmp_path / "logs"
    job = start(tmp_path / "run", f"launcher={{plugin='slurm', executor='local', gpus_per_node=0, cpus_per_task=1, "
                                  f"folder='{logs}/%j'}}")
    wait_until_training(job, tmp_path / "run")
    preemption = submitit.JobEnvironment._usr_sig()
    os.kill(submitit_task(job.pid), preemption)
    stdout, stderr = job.communicate(timeout=240)
    assert job.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert f"done: {STEPS} steps" in stdout

    job_id = re.search(r"submitted job (\d+)", stdout).group(1)
    log = (logs / job_id / f"{job_id}_0_log.out").read_text()
    stopped = re.search(rf"stopped by {preemption.name} after step (\d+)", log)
    assert stopped and "requeueing through submitit" in log, log
    assert "Requeued job" in log and log.count("Starting with JobEnvironment") == 2, log  # two starts of one job
    step = int(stopped.group(1))
    assert 10 <= step < STEPS and f"resumed from step {step} (step-{step:08d}.pt)" in log, log
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    assert names == [f"step-{step:08d}.pt", f"step-{STEPS:08d}.pt"], names

    reference.communicate(timeout=240)
    assert reference.returncode == 0
    whole = ckpt.load(ckpt.latest(tmp_path / "whole" / "checkpoints"))
    assert_equal_states(ckpt.load(ckpt.latest(tmp_path / "run" / "checkpoints")), whole)  # bitwise


def stopped_by(signum: int):
    def entry(accelerator, resume: bool):
        raise StopRequested(signum, 7, None)
    return entry


def test_only_the_preemption_signal_requeues(monkeypatch):
    """Inside a submitit task, a stop by the preemption signal calls submitit's requeue handler; any other
    stop signal (SIGTERM from ``scancel``, a terminal's SIGINT) ends the job with its StopRequested (the
    checkpoint is written; continue with --resume)."""
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "1", "SUBMITIT_LOCAL_NTASKS": "1",
                       "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(key, value)
    preemption, requeued = submitit.JobEnvironment._usr_sig(), []
    previous = signal.signal(preemption, lambda signum, frame: requeued.append(signum))  # stands for submitit's
    try:
        with pytest.raises(StopRequested) as info:
            TrainJob(stopped_by(signal.SIGTERM), (False,), {}, "cpu")()
        assert info.value.exit_status == 143 and requeued == []
        assert TrainJob(stopped_by(preemption), (False,), {}, "cpu")() is None
        assert requeued == [preemption]
    finally:
        signal.signal(preemption, previous)
