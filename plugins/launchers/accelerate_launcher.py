"""The `accelerate` launcher: N processes on this machine, or one machine's share of an N-machine job.

``python -m core.run x.toml`` with ``[launcher] plugin = "accelerate"`` starts
``num_processes`` worker processes itself (one per GPU, or CPU processes with
the gloo backend on a machine without GPUs). Each worker gets the standard
``torch.distributed`` environment

    WORLD_SIZE = num_machines * num_processes
    RANK       = machine_rank * num_processes + local_rank
    LOCAL_RANK = local_rank,  MASTER_ADDR = main_process_ip,  MASTER_PORT = main_process_port

and builds an ``accelerate.Accelerator`` from it. When the file is started
under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE``/``LOCAL_RANK``
already set), nothing is spawned: this process is one of the workers.

A failure on any rank stops every rank; a `ConfigError` raised on a rank is
re-raised in the launching process (exit status 2). A rank that dies without a
word (a segfault, SIGKILL, the out-of-memory killer) is named with its exit
status ("rank 1 died (exit -9, SIGKILL)") rather than the survivors' gloo /
NCCL errors it causes. Workers die with the launcher (`core.signals.watch_parent`)
and run in their own process group; SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 sent to
the launcher are forwarded once to every worker, which checkpoint at the next
step boundary and stop (a second signal kills them at once).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from core.collectives import close_process_group
from core.interfaces import Launcher
from core.validate import device_available
from registry import ConfigError


@attrs.define
class AccelerateConfig:
    """Options of the accelerate launcher.

    Attributes:
        num_processes: processes on this machine (one per GPU; CPU processes when there is no GPU).
        num_machines: machines in the job.
        machine_rank: this machine's index in [0, num_machines).
        main_process_ip: address of machine 0.
        main_process_port: port of the rendezvous on machine 0 (0: a free port, single machine only).
        device: "auto" (GPUs when visible), "cpu" or "cuda".
        threads_per_process: torch intra-op threads per CPU process (0: cores / processes).
        timeout_s: how long a rank waits at the rendezvous, at a barrier or in a collective before it
            fails with an error (torch.distributed's default is 1800 s).
    """

    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_process: int = 0
    timeout_s: int = 1800

    def __attrs_post_init__(self) -> None:
        if self.num_processes < 1:
            raise ConfigError(f"expected a positive integer, got {self.num_processes}", ("num_processes",))
        if self.num_machines < 1:
            raise ConfigError(f"expected a positive integer, got {self.num_machines}", ("num_machines",))
        if not 0 <= self.machine_rank < self.num_machines:
            raise ConfigError(f"expected 0 <= machine_rank < num_machines = {self.num_machines}, got {self.machine_rank}",
                              ("machine_rank",))
        if self.timeout_s < 1:
            raise ConfigError(f"expected a positive number of seconds, got {self.timeout_s}", ("timeout_s",))
        if self.num_machines > 1 and self.main_process_port == 0:
            raise ConfigError("a job on several machines needs a fixed main_process_port (the same on every machine)",
                              ("main_process_port",))


def already_distributed() -> bool:
    """True inside ``torchrun`` / ``accelerate launch`` / Slurm-exported workers."""
    return "WORLD_SIZE" in os.environ and ("LOCAL_RANK" in os.environ or "RANK" in os.environ)


#: what MPI launchers export instead of ``WORLD_SIZE`` (accelerate reads them for CPU jobs under mpirun)
_MPI_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def warn_if_accelerate_started_one_process() -> bool:
    """Warn (stderr) when ``accelerate launch`` was asked for several processes but started only this one.

    ``accelerate launch --cpu --num_processes N`` (and ``--num_processes N`` with fewer than two GPUs
    and no ``--multi_gpu``) runs its "simple" launcher: one process with ``MASTER_ADDR``/``MASTER_PORT``
    exported and no ``WORLD_SIZE``, leaving the other processes to mpirun. That process trains alone.
    Returns whether it warned.
    """
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" not in env or "MASTER_PORT" not in env or "WORLD_SIZE" in env \
            or any(k in env for k in _MPI_SIZE):
        return False
    print("flowforge: warning: `accelerate launch` started only this process (it exported MASTER_PORT but no "
          "WORLD_SIZE: with --cpu, or without --multi_gpu, it leaves the other processes to mpirun), so this run "
          "trains on 1 process. For N processes: `accelerate launch --multi_gpu --num_processes N -m core.run ...` "
          "(torchrun underneath; gloo on CPU when no GPU is visible) or `torchrun --nproc_per_node N -m core.run ...`",
          file=sys.stderr, flush=True)
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(accelerator_kwargs: Mapping[str, Any], device: str = "auto", timeout_s: int | None = None) -> Any:
    """An Accelerator for this process (CPU when asked or when no GPU is visible).

    With ``WORLD_SIZE > 1`` this joins the process group; `timeout_s` bounds the rendezvous and
    every later collective, and a failed rendezvous names the address it waited for.
    """
    import datetime

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    kwargs = dict(accelerator_kwargs)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        kwargs["cpu"] = True
    if timeout_s:
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []),
                                     InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))]
    try:
        return Accelerator(**kwargs)
    except Exception as exc:  # noqa: BLE001 - a rendezvous failure: say where and how long
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(
            f"rank {os.environ.get('RANK', '?')}: could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {timeout_s or 'the default'} s "
            f"({type(exc).__name__}: {first[:300]}); is every machine running the same command, and did "
            f"rank 0 (machine 0) start? See its output") from None


def _worker(local_rank: int, config: AccelerateConfig, port: int, entry: Callable[..., Any], args: tuple,
            accelerator_kwargs: Mapping[str, Any], results: Any) -> None:
    from core import signals

    signals.watch_parent()
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the launcher only; it forwards it once
    world = config.num_machines * config.num_processes
    rank = config.machine_rank * config.num_processes + local_rank
    os.environ.update({
        "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(config.num_processes), "MASTER_ADDR": config.main_process_ip,
        "MASTER_PORT": str(port),
    })
    threads = config.threads_per_process or max(1, (os.cpu_count() or 1) // config.num_processes)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    try:
        accelerator = make_accelerator(accelerator_kwargs, config.device, config.timeout_s)
        torch.set_num_threads(threads)
        result = entry(accelerator, *args)
        results.put((rank, "ok", result if rank == 0 else None))
    except signals.StopRequested as exc:
        results.put((rank, "stopped", (exc.signum, exc.step, exc.checkpoint)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", {
            "type": type(exc).__name__, "message": str(exc), "config_error": isinstance(exc, ConfigError),
            "interrupt": isinstance(exc, KeyboardInterrupt), "traceback": traceback.format_exc()}))
        sys.exit(1)
    finally:
        close_process_group()


_COMMUNICATION = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out",
                  "no word from rank 0", "could not join the process group")


def is_communication_error(err: Mapping[str, Any]) -> bool:
    """Whether a rank's error is the echo of another rank's failure (a closed connection, a timeout)."""
    text = f"{err['type']} {err['message']}".lower()
    return err["type"].startswith("Dist") or any(word in text for word in _COMMUNICATION)


def describe_exit(code: int) -> str:
    """``-9`` -> ``"exit -9, SIGKILL"``."""
    if code < 0:
        try:
            return f"exit {code}, {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit {code}"


def diagnose(outcome: Mapping[int, tuple[str, Any]], exit_codes: Mapping[int, int | None]) -> BaseException | None:
    """The error to raise for a finished group of ranks, naming the rank that caused it; None on success.

    Priority: a rank that died without reporting (named with its exit status), then a rank's own
    error (configuration errors first), then the echoes (communication errors) of the lowest rank.
    """
    from core.signals import StopRequested

    died = {r: c for r, c in exit_codes.items() if r not in outcome and c not in (None, 0)}
    errors = {r: v for r, (s, v) in outcome.items() if s == "error"}
    stopped = {r: v for r, (s, v) in outcome.items() if s == "stopped"}
    if died:
        rank, code = min(died.items())
        others = "; ".join(f"rank {r}: {v['type']}" for r, v in sorted(errors.items()))
        return RuntimeError(f"rank {rank} died ({describe_exit(code)}) without reporting an error"
                            + (f"; the other ranks then failed ({others})" if others else ""))
    if errors:
        primary = {r: v for r, v in errors.items() if not is_communication_error(v)} or errors
        rank, err = min(primary.items(), key=lambda item: (not item[1]["config_error"], item[0]))
        if err["config_error"]:
            message = err["message"]
            return ConfigError(message if message.startswith("rank ") else f"rank {rank}: {message}")
        if err["interrupt"]:
            return KeyboardInterrupt()
        if err["type"] == "NonFiniteLossError":
            from core.errors import NonFiniteLossError

            return NonFiniteLossError(err["message"])
        return RuntimeError(f"rank {rank} failed with {err['type']}: {err['message']}\n{err['traceback']}")
    if stopped:
        signum, step, path = stopped[min(stopped)]
        return StopRequested(signum, step, path)
    if len(outcome) < len(exit_codes):
        return RuntimeError(f"worker processes exited without a result (exit codes {dict(exit_codes)})")
    return None


class _Forwarder:
    """While the workers run: the first stop signal is forwarded to every worker; a second kills them."""

    def __init__(self, procs: list[Any]):
        self.procs, self.count, self.previous = procs, 0, {}

    def __enter__(self) -> "_Forwarder":
        from core.signals import STOP_SIGNALS

        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        for p in self.procs:
            if p.is_alive() and p.pid:
                try:
                    os.kill(p.pid, signum if self.count == 1 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.count > 1:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class AccelerateLauncher(Launcher):
    """See the module docstring."""

    #: How long the launcher waits for the other ranks' reports after the first failure.
    grace_s: float = 5.0

    def __init__(self, config: AccelerateConfig | None = None):
        self.config = config or AccelerateConfig()
        device_available(self.config.device)  # here, not in the config: a run trained on GPUs samples anywhere

    @property
    def hosts_rank_zero(self) -> bool:
        """Whether this machine runs global rank 0 (and so checks the run directory before starting)."""
        return self.config.machine_rank == 0

    def launch(self, entry: Callable[..., Any], *args: Any, accelerator_kwargs: Mapping[str, Any]) -> Any:
        kwargs = dict(accelerator_kwargs)
        warn_if_accelerate_started_one_process()
        if already_distributed() or (self.config.num_processes == 1 and self.config.num_machines == 1):
            if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun / accelerate launch: die with the agent
                from core.signals import watch_parent

                watch_parent()
            return entry(make_accelerator(kwargs, self.config.device, self.config.timeout_s), *args)
        return self._spawn(entry, args, kwargs)

    def _spawn(self, entry: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> Any:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        port = self.config.main_process_port or free_port()
        procs = [ctx.Process(target=_worker, args=(r, self.config, port, entry, args, kwargs, results), daemon=False)
                 for r in range(self.config.num_processes)]
        first = self.config.machine_rank * self.config.num_processes
        try:
            with _Forwarder(procs):
                for p in procs:
                    p.start()
                outcome = self._collect(procs, results, first)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        failure = diagnose(outcome, {first + i: p.exitcode for i, p in enumerate(procs)})
        if failure is not None:
            raise failure
        return outcome.get(first, (None, None))[1] if self.config.machine_rank == 0 else None

    def _collect(self, procs: list[Any], results: Any, first: int) -> dict[int, tuple[str, Any]]:
        """Every rank's report; after the first failure, wait `grace_s` for the others, then stop them."""
        outcome: dict[int, tuple[str, Any]] = {}
        deadline = None
        while len(outcome) < len(procs):
            while not results.empty():
                rank, status, payload = results.get()
                outcome[rank] = (status, payload)
            failed = any(s == "error" for s, _ in outcome.values()) or any(
                p.exitcode not in (None, 0) and first + i not in outcome for i, p in enumerate(procs))
            if failed and deadline is None:
                deadline = time.monotonic() + self.grace_s
            if deadline is not None and (time.monotonic() > deadline or all(p.exitcode is not None for p in procs)):
                time.sleep(0.1)  # a report written just before its process exited
                while not results.empty():
                    rank, status, payload = results.get()
                    outcome[rank] = (status, payload)
                break
            if all(p.exitcode is not None for p in procs) and results.empty():
                break
            time.sleep(0.05)
        for i, p in enumerate(procs):
            if p.is_alive() and first + i not in outcome:
                p.terminate()
        return outcome


def make_accelerate(config: AccelerateConfig | None = None) -> AccelerateLauncher:
    """Launcher factory for ``plugin = "accelerate"``."""
    return AccelerateLauncher(config)
