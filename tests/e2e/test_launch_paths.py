"""Every external launch path: torchrun and two "machines" sharing one --out (fresh, repeated), and
``accelerate launch`` with 2 CPU processes (fresh, --overwrite, --resume).

Each run is the real main experiment made small, started as a user would. What must hold on every
try: exit 0 on every process, one summary printed (by global rank 0 only), one config.toml and the
final checkpoint in the shared directory, and the same parameters as the one-process run (the
process-count invariance of tests/e2e/test_process_invariance.py, here through the external launchers).
"""

from __future__ import annotations

import os
import shutil
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
#: tries per path: 1 in the suite (each try starts 2 processes, about 20 s); ``LAUNCH_TRIES=5 python -m pytest tests/e2e/test_launch_paths.py`` for the record
TRIES = int(os.environ.get("LAUNCH_TRIES", "1"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(*overrides: str) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


def final_params(out: Path, world: int | None = None) -> dict[str, torch.Tensor]:
    """The model of the step-12 checkpoint (`world`: the process count it must have been written by)."""
    state = ckpt.load(ckpt.latest(out / "checkpoints"))
    assert state["step"] == 12
    assert world is None or state["world_size"] == world, f"trained on {state['world_size']} process(es), not {world}"
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


def check_shared_run(out: Path, outputs: list[str], one: dict, world: int = 2) -> None:
    assert sum(text.count("done: 12 steps") for text in outputs) == 1, "not exactly one summary:\n" + "\n".join(outputs)
    assert (out / "config.toml").is_file() and (out / "summary.json").is_file()
    assert not list(out.rglob("*.tmp*")), "temporaries left behind"
    assert close(final_params(out, world), one), "the launched run differs from the one-process run"


@pytest.mark.parametrize("attempt", range(TRIES))
def test_torchrun_two_processes_on_a_fresh_directory(tmp_path, one_process, attempt):
    out = tmp_path / "run"
    proc = torchrun_two_processes(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_shared_run(out, [proc.stdout], one_process)


def torchrun_two_processes(out: Path) -> subprocess.CompletedProcess:
    cmd = ["torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
           *core_run(out, "launcher.plugin='accelerate'")]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_torchrun_on_a_directory_that_holds_a_run_ends_every_rank_with_rank_zeros_refusal(tmp_path, accelerate_fresh):
    """Without --resume / --overwrite, rank 0 refuses the run directory and rank 1 exits with that message
    (not its own "already holds a run" race, not a hang); the old run is untouched."""
    out = tmp_path / "run"
    shutil.copytree(accelerate_fresh[0], out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    proc = torchrun_two_processes(out)
    assert proc.returncode != 0
    assert proc.stderr.count("already holds a run") >= 2, proc.stderr[-3000:]  # rank 0's, and rank 1's echo
    assert "rank 0 refused the run directory" in proc.stderr, proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before


def run_two_nodes(out: Path, command) -> list[str]:
    """Start ``command(node_rank, port)`` for node ranks 1 and 0 together (the second node may well start
    first), as two cluster nodes sharing one filesystem would; every one must exit 0; their stdouts."""
    port, procs = free_port(), []
    for node in (1, 0):
        procs.append(subprocess.Popen(command(node, port), cwd=ROOT, env={**ENV, "HF_HOME": str(out.parent / "hf")},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [stdout for stdout, _ in results]


def core_run(out: Path, *overrides: str) -> list[str]:
    return ["-m", "core.run", str(RF2D), "--out", str(out), *sets(*SMALL, *overrides)]


@pytest.mark.parametrize("attempt", range(TRIES))
def test_two_machines_sharing_one_out_directory(tmp_path, one_process, attempt):
    """Two launchers (machine_rank 0 and 1, one process each) started together on one --out."""
    out = tmp_path / "run"

    def command(machine: int, port: int) -> list[str]:
        launcher = (f"launcher={{plugin='accelerate', num_machines=2, machine_rank={machine}, num_processes=1, "
                    f"main_process_ip='127.0.0.1', main_process_port={port}, timeout_s=120}}")
        return [sys.executable, *core_run(out, launcher)]

    check_shared_run(out, run_two_nodes(out, command), one_process)


def test_torchrun_on_two_nodes_sharing_one_out_directory(tmp_path, one_process):
    """``torchrun --nnodes 2 --node_rank R`` (static rendezvous at the master's address), one process per node."""
    out = tmp_path / "run"

    def command(node: int, port: int) -> list[str]:
        return ["torchrun", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                f"--master_port={port}", *core_run(out, "launcher.plugin='accelerate'")]

    check_shared_run(out, run_two_nodes(out, command), one_process)


def test_accelerate_launch_on_two_machines_sharing_one_out_directory(tmp_path, one_process):
    """``accelerate launch --multi_gpu --num_machines 2 --machine_rank R --num_processes 2`` (the total over
    machines), one process per machine."""
    out = tmp_path / "run"

    def command(machine: int, port: int) -> list[str]:
        return ["accelerate", "launch", "--multi_gpu", "--num_machines=2", f"--machine_rank={machine}",
                "--num_processes=2", "--main_process_ip=127.0.0.1", f"--main_process_port={port}",
                "--mixed_precision=no", "--dynamo_backend=no", *core_run(out, "launcher.plugin='accelerate'")]

    check_shared_run(out, run_two_nodes(out, command), one_process)


# --------------------------------------------------------------------------- accelerate launch
def accelerate_launch(flags: list[str], out: Path, *run_flags: str, home: Path) -> subprocess.CompletedProcess:
    """``accelerate launch FLAGS -m core.run rectified_flow_2d.toml --out OUT RUN_FLAGS`` (no accelerate config file:
    HF_HOME points at an empty folder, so only the flags count)."""
    cmd = ["accelerate", "launch", *flags, "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
           *core_run(out, "launcher.plugin='accelerate'"), *run_flags]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, "HF_HOME": str(home)}, capture_output=True, text=True,
                          timeout=300)


def two_cpu_processes() -> list[str]:
    """What starts 2 gloo CPU processes: ``--multi_gpu`` (torchrun underneath), no GPU visible. (``--cpu
    --num_processes 2`` starts one; see the last test.)"""
    return ["--multi_gpu", "--num_processes=2", f"--main_process_port={free_port()}"]


@pytest.fixture(scope="module")
def accelerate_fresh(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("accelerate")
    out = root / "run"
    return out, accelerate_launch(two_cpu_processes(), out, home=root / "hf")


def test_accelerate_launch_two_processes_on_a_fresh_directory(accelerate_fresh, one_process):
    out, proc = accelerate_fresh
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_shared_run(out, [proc.stdout], one_process)


def test_accelerate_launch_two_processes_overwrite(tmp_path, accelerate_fresh, one_process):
    out = tmp_path / "run"
    shutil.copytree(accelerate_fresh[0], out)
    (out / "checkpoints" / "step-00000099.pt").write_bytes(b"from the old run")
    proc = accelerate_launch(two_cpu_processes(), out, "--overwrite", home=tmp_path / "hf")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (out / "checkpoints" / "step-00000099.pt").exists(), "--overwrite kept a file of the old run"
    check_shared_run(out, [proc.stdout], one_process)


def test_accelerate_launch_two_processes_resume(tmp_path, accelerate_fresh, one_process):
    """The run loses its last checkpoint and summary (as if killed after step 6) and resumes on 2 processes."""
    out = tmp_path / "run"
    shutil.copytree(accelerate_fresh[0], out)
    (out / "checkpoints" / "step-00000012.pt").unlink()
    (out / "summary.json").unlink()
    proc = accelerate_launch(two_cpu_processes(), out, "--resume", home=tmp_path / "hf")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("resumed from step 6") == 1, proc.stdout
    check_shared_run(out, [proc.stdout], one_process)


def test_accelerate_launch_cpu_flag_starts_one_process_and_says_so(tmp_path, one_process):
    """``accelerate launch --cpu --num_processes 2`` runs one process (accelerate leaves the rest to mpirun):
    it trains alone, to the same parameters, and the user is told how to get 2."""
    out = tmp_path / "run"
    proc = accelerate_launch(["--cpu", "--num_processes=2"], out, home=tmp_path / "hf")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "started only this process" in proc.stderr and "--multi_gpu --num_processes N" in proc.stderr
    check_shared_run(out, [proc.stdout], one_process, world=1)
