"""Graceful stops: SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 end a run at the next step boundary.

A signal handler only records the signal. The trainer asks `should_stop` after
each optimizer step; on several processes the ranks agree (an all-reduce of
the flag, so every rank stops after the same step and takes part in the
checkpoint). It then writes a checkpoint and raises `StopRequested`, which
the runner turns into a message and exit status ``128 + signal number``
(SIGINT 130, SIGUSR1 138, SIGTERM 143, SIGUSR2 140): the shell convention for
"ended by this signal", here with the checkpoint written.

Repeated signals while a stop is pending are ignored (Slurm signals every
task and the launcher forwards its own: one stop, not two); SIGKILL still
ends a process at once.

Workers also watch their launcher (`watch_parent`): when it dies, they die.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None),
                                 getattr(signal, "SIGUSR2", None)) if s is not None)

_pending: list[int] = []  # the first signal received, if any


class StopRequested(Exception):
    """The run stopped on a signal after writing a checkpoint at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {signal_name(signum)} after step {step}{where}; continue with --resume")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __reduce__(self) -> Any:  # picklable across process boundaries (launcher result queues)
        return (StopRequested, (self.signum, self.step, self.checkpoint))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _record(signum: int, frame: Any) -> None:
    if not _pending:
        _pending.append(signum)
        print(f"flowforge: received {signal_name(signum)}; stopping after the current step "
              f"(a checkpoint is written first)", file=sys.stderr, flush=True)


def pending() -> int | None:
    """The signal number of a requested stop, or None."""
    return _pending[0] if _pending else None


def request(signum: int) -> None:
    """Request a stop as if `signum` had been received (used by tests and by wrapping launchers)."""
    _record(signum, None)


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, `signals` request a stop instead of killing the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending.clear()
    previous = {s: signal.signal(s, _record) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def should_stop(accelerator: Any, check_collectively: bool) -> int | None:
    """The agreed stop signal (any rank's), or None. Collective when ``check_collectively`` and W > 1.

    Every rank must call this at the same steps with the same `check_collectively`.
    """
    mine = pending() or 0
    if accelerator is None or accelerator.num_processes == 1:
        return mine or None
    if not check_collectively:
        return None
    import torch

    flag = torch.tensor([mine], dtype=torch.int64, device=accelerator.device)
    import torch.distributed as dist

    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


# --------------------------------------------------------------------------- parent watch
def watch_parent(interval_s: float = 0.5) -> None:
    """End this process when its parent (the launcher) dies.

    On Linux the kernel sends SIGKILL when the parent exits (``PR_SET_PDEATHSIG``); a daemon thread
    that polls the parent id covers other systems and the moment before the request took effect.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # pragma: no cover - no libc
            pass

    def poll() -> None:
        while True:
            if os.getppid() != parent:
                print("flowforge: the launcher process died; this worker exits", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(interval_s)

    if os.getppid() != parent:  # pragma: no cover - died before we looked
        os._exit(1)
    threading.Thread(target=poll, name="flowforge-parent-watch", daemon=True).start()
