"""Run-directory lock, resume fallback, metrics truncation, config-change record, stale temporaries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from core import checkpoint as ckpt
from core.rundir import RunDir, config_changes
from registry import ConfigError


def test_a_live_lock_refuses_overwrite_and_resume(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rd = RunDir(tmp_path)
        rd.config.write_text("[trainer]\nsteps = 1\n")
        rd.lock_file.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "x"}))
        for kwargs in ({"resume": True, "overwrite": False}, {"resume": False, "overwrite": True}):
            with pytest.raises(ConfigError, match=f"in use by pid {holder.pid}"):
                RunDir(tmp_path).prepare(**kwargs)
        assert rd.config.exists()  # nothing wiped
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rd = RunDir(tmp_path)
    rd.config.write_text("[trainer]\nsteps = 1\n")
    rd.lock_file.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    rd.prepare(resume=True, overwrite=False)
    assert json.loads(rd.lock_file.read_text())["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().err
    rd.release_lock()
    assert not rd.lock_file.exists()


def test_a_refused_fresh_run_leaves_nothing_behind(tmp_path):
    with pytest.raises(ConfigError, match="no run to resume"):
        RunDir(tmp_path / "new").prepare(resume=True, overwrite=False)
    assert not (tmp_path / "new").exists()


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    ckpt.save_atomic({"step": 3, "x": torch.ones(2)}, ckpt.path_for(tmp_path, 3))
    ckpt.path_for(tmp_path, 6).write_bytes(b"not a checkpoint")
    said = []
    path, state = ckpt.load_newest_readable(tmp_path, report=said.append)
    assert state["step"] == 3 and path.name == "step-00000003.pt"
    assert "step-00000006.pt" in said[0] and "step-00000003.pt" in said[1]


def test_stale_temporaries_are_removed_on_resume(tmp_path):
    rd = RunDir(tmp_path)
    rd.checkpoints.mkdir(parents=True)
    rd.config.write_text("a = 1\n")
    (rd.checkpoints / ".step-00000004.pt.tmp-123").write_bytes(b"half")
    rd.prepare(resume=True, overwrite=False)
    assert not list(rd.checkpoints.glob(".*tmp*"))
    rd.release_lock()


def test_metrics_are_truncated_to_the_resumed_step(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)) + '{"step": 2')
    assert rd.truncate_metrics(10) == 2
    assert [r["step"] for r in rd.read_metrics()] == [5, 10]


def test_resume_with_a_changed_value_records_old_and_new(tmp_path):
    rd = RunDir(tmp_path)
    rd.config.write_text("[trainer]\nsteps = 3\nlr = 0.1\n")
    changes = rd.write_config("[trainer]\nsteps = 6\nlr = 0.1\n", resume=True)
    assert changes == {"trainer.steps": [3, 6]}
    assert json.loads(rd.resume_log.read_text())["changes"] == {"trainer.steps": [3, 6]}
    assert config_changes("a = 1\n", "a = 1\n") == {}
