"""The `slurm` launcher: submit the run to a Slurm cluster through submitit.

One task per GPU (``gpus_per_node`` tasks on each of ``nodes`` nodes; one CPU
task when ``gpus_per_node = 0``). Each task exports the ``torch.distributed``
environment from Slurm's (submitit's ``TorchDistributedEnvironment``) and runs
the training entry point with an ``accelerate.Accelerator``. On preemption or
time-out the job checkpoints itself (submitit's ``Checkpointable``) and is
requeued with ``resume = True``, so it continues from the checkpoint the
trainer writes at the step boundary after the signal (see `TrainJob`). ``executor = "local"`` runs the
same job through submitit's local executor, whose controller restarts a requeued task: how
tests/plugins/launchers/test_slurm_requeue.py exercises preemption, requeue and resume end to end.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from core.interfaces import Launcher
from registry import ConfigError

from .accelerate_launcher import make_accelerator


@attrs.define
class SlurmConfig:
    """Options of the slurm launcher.

    Attributes:
        nodes: number of nodes.
        gpus_per_node: GPUs (and tasks) per node; 0 runs one CPU task per node.
        cpus_per_task: CPU cores per task.
        mem_gb: memory per node in GB (0: the partition's default).
        partition: Slurm partition ("" for the default).
        account: Slurm account ("" for none).
        qos: Slurm quality of service ("" for none).
        constraint: Slurm constraint, e.g. "volta32gb" ("" for none).
        time_min: time limit of one job in minutes (a requeued job gets another).
        job_name: the job's name.
        folder: where submitit writes logs and pickles ("%j" is the job id).
        requeue: resubmit on preemption / time-out and resume from the last checkpoint.
        max_requeues: how many times a job may be requeued.
        executor: "slurm", or "local" (submitit's local executor, for testing).
        wait: block until the job ends and return its summary (default: only for the local executor).
    """

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 0
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 60 * 24
    job_name: str = "flowforge"
    folder: str = "runs/slurm/%j"
    requeue: bool = True
    max_requeues: int = 10
    executor: Literal["slurm", "local"] = "slurm"
    wait: bool | None = None

    def __attrs_post_init__(self) -> None:
        for key in ("nodes", "cpus_per_task", "time_min"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))
        if self.gpus_per_node < 0:
            raise ConfigError(f"expected a non-negative integer, got {self.gpus_per_node}", ("gpus_per_node",))


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("the slurm launcher needs submitit: pip install 'flowforge[slurm]'") from None
    return submitit


class TrainJob:
    """The callable submitted to Slurm; requeues itself with ``resume = True`` when preempted.

    The entry point's last positional argument is its ``resume`` flag (see
    `core.interfaces.Launcher`).

    Preemption: submitit's own handler of its preemption signal (SIGUSR2) would checkpoint and
    requeue at once, in the middle of a step. Inside the entry the trainer takes that signal
    instead (`core.signals`): it finishes the step, writes a checkpoint and raises `StopRequested`;
    then this job calls submitit's saved handler, which does exactly what it would have done
    (``checkpoint()`` -> the resumed `DelayedSubmission` is dumped -> the job is requeued: ``scontrol
    requeue`` on Slurm, exit status 144 that the local executor restarts).
    """

    def __init__(self, entry: Callable[..., Any], args: tuple, accelerator_kwargs: Mapping[str, Any], device: str):
        self.entry, self.args, self.accelerator_kwargs, self.device = entry, tuple(args), dict(accelerator_kwargs), device

    def __call__(self) -> Any:
        from core.signals import StopRequested

        submitit = _submitit()
        env = submitit.JobEnvironment()
        preemption = env._usr_sig()
        requeue = signal.getsignal(preemption)  # submitit's checkpoint_and_try_requeue
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        accelerator = make_accelerator(self.accelerator_kwargs, self.device)
        try:
            return self.entry(accelerator, *self.args)
        except StopRequested as exc:
            if exc.signum != preemption or not callable(requeue):
                raise
            print(f"flowforge: {exc}; requeueing through submitit", flush=True)
            requeue(exc.signum, None)  # exits on the rank that requeues (global rank 0)
            return None

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption or time-out: resubmit, resuming from the last checkpoint."""
        submitit = _submitit()
        resumed = TrainJob(self.entry, (*self.args[:-1], True), self.accelerator_kwargs, self.device)
        return submitit.helpers.DelayedSubmission(resumed)


class SlurmLauncher(Launcher):
    """See the module docstring."""

    def __init__(self, config: SlurmConfig | None = None):
        self.config = config or SlurmConfig()

    def executor(self) -> Any:
        submitit, c = _submitit(), self.config
        folder = Path(c.folder)
        executor = submitit.AutoExecutor(folder=folder, cluster="local" if c.executor == "local" else "slurm")
        params: dict[str, Any] = {
            "name": c.job_name, "timeout_min": c.time_min, "nodes": c.nodes,
            "tasks_per_node": max(1, c.gpus_per_node), "cpus_per_task": c.cpus_per_task,
        }
        if c.executor == "slurm":
            params["gpus_per_node"] = c.gpus_per_node
            if c.mem_gb:
                params["mem_gb"] = c.mem_gb
            for key, name in (("partition", "slurm_partition"), ("account", "slurm_account"),
                              ("qos", "slurm_qos"), ("constraint", "slurm_constraint")):
                if getattr(c, key):
                    params[name] = getattr(c, key)
            params["slurm_max_num_timeout"] = c.max_requeues if c.requeue else 0
        executor.update_parameters(**params)
        return executor

    def launch(self, entry: Callable[..., Any], *args: Any, accelerator_kwargs: Mapping[str, Any]) -> Any:
        kwargs = dict(accelerator_kwargs)
        device = "cpu" if self.config.gpus_per_node == 0 else "auto"
        job = self.executor().submit(TrainJob(entry, args, kwargs, device))
        print(f"flowforge: submitted job {job.job_id} (logs in {self.config.folder.replace('%j', str(job.job_id))})")
        wait = self.config.wait if self.config.wait is not None else self.config.executor == "local"
        if not wait:
            return {"job_id": str(job.job_id)}
        results = job.results()
        return results[0]


def make_slurm(config: SlurmConfig | None = None) -> SlurmLauncher:
    """Launcher factory for ``plugin = "slurm"``."""
    return SlurmLauncher(config)
