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
re-raised in the launching process (exit status 2).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

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
    """

    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_process: int = 0

    def __attrs_post_init__(self) -> None:
        if self.num_processes < 1:
            raise ConfigError(f"expected a positive integer, got {self.num_processes}", ("num_processes",))
        if self.num_machines < 1:
            raise ConfigError(f"expected a positive integer, got {self.num_machines}", ("num_machines",))
        if not 0 <= self.machine_rank < self.num_machines:
            raise ConfigError(f"expected 0 <= machine_rank < num_machines = {self.num_machines}, got {self.machine_rank}",
                              ("machine_rank",))
        if self.num_machines > 1 and self.main_process_port == 0:
            raise ConfigError("a job on several machines needs a fixed main_process_port (the same on every machine)",
                              ("main_process_port",))


def already_distributed() -> bool:
    """True inside ``torchrun`` / ``accelerate launch`` / Slurm-exported workers."""
    return "WORLD_SIZE" in os.environ and ("LOCAL_RANK" in os.environ or "RANK" in os.environ)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(accelerator_kwargs: Mapping[str, Any], device: str = "auto") -> Any:
    """An Accelerator for this process (CPU when asked or when no GPU is visible)."""
    import torch
    from accelerate import Accelerator

    kwargs = dict(accelerator_kwargs)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        kwargs["cpu"] = True
    return Accelerator(**kwargs)


def _worker(local_rank: int, config: AccelerateConfig, port: int, entry: Callable[..., Any], args: tuple,
            accelerator_kwargs: Mapping[str, Any], results: Any) -> None:
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
        accelerator = make_accelerator(accelerator_kwargs, config.device)
        torch.set_num_threads(threads)
        result = entry(accelerator, *args)
        results.put((rank, "ok", result if rank == 0 else None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        is_config = isinstance(exc, ConfigError)
        results.put((rank, "error", {
            "type": type(exc).__name__, "message": str(exc), "config_error": is_config,
            "interrupt": isinstance(exc, KeyboardInterrupt), "traceback": traceback.format_exc()}))
        sys.exit(1)
    finally:
        close_process_group()


def close_process_group() -> None:
    """Free what still refers to the process group (autograd nodes of differentiable collectives), then
    destroy it: left to interpreter shutdown, gloo's threads can be torn down in the wrong order and abort."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class AccelerateLauncher(Launcher):
    """See the module docstring."""

    def __init__(self, config: AccelerateConfig | None = None):
        self.config = config or AccelerateConfig()
        device_available(self.config.device)  # here, not in the config: a run trained on GPUs samples anywhere

    def launch(self, entry: Callable[..., Any], *args: Any, accelerator_kwargs: Mapping[str, Any]) -> Any:
        kwargs = dict(accelerator_kwargs)
        if already_distributed():
            return entry(make_accelerator(kwargs, self.config.device), *args)
        if self.config.num_processes == 1 and self.config.num_machines == 1:
            return entry(make_accelerator(kwargs, self.config.device), *args)
        return self._spawn(entry, args, kwargs)

    def _spawn(self, entry: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> Any:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        port = self.config.main_process_port or free_port()
        procs = [ctx.Process(target=_worker, args=(r, self.config, port, entry, args, kwargs, results), daemon=False)
                 for r in range(self.config.num_processes)]
        for p in procs:
            p.start()
        outcome: dict[int, tuple[str, Any]] = {}
        try:
            while len(outcome) < len(procs):
                if not results.empty():
                    rank, status, payload = results.get()
                    outcome[rank] = (status, payload)
                    if status == "error":
                        break
                    continue
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    break
                for p in procs:
                    p.join(timeout=0.05)
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            raise
        errors = {r: v for r, (s, v) in outcome.items() if s == "error"}
        if errors or len(outcome) < len(procs):
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
        else:
            for p in procs:
                p.join()
        if errors:
            rank, err = min(errors.items())
            if err["config_error"]:
                raise ConfigError(f"rank {rank}: {err['message']}")
            if err["interrupt"]:
                raise KeyboardInterrupt
            if err["type"] == "NonFiniteLossError":
                from core.trainer import NonFiniteLossError

                raise NonFiniteLossError(err["message"])
            raise RuntimeError(f"rank {rank} failed with {err['type']}: {err['message']}\n{err['traceback']}")
        if len(outcome) < len(procs):
            codes = {i: p.exitcode for i, p in enumerate(procs)}
            raise RuntimeError(f"worker processes exited without a result (exit codes {codes})")
        local_zero = self.config.machine_rank * self.config.num_processes
        return outcome.get(local_zero, (None, None))[1] if self.config.machine_rank == 0 else None
