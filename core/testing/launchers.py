"""Conformance checks for launchers: ``launch(entry, *args, accelerator_kwargs) -> rank 0's result``.

::

    from core.testing.launchers import check_launcher
    check_launcher(registry.build("launcher", {"plugin": "mine"}), name="mine")

The kit launches `probe_entry`, a picklable top-level function, which writes
one file per process into a scratch directory (pass ``workdir`` on a
filesystem every process sees, for multi-machine launchers) and returns its
rank. The invariants, each named in the ``AssertionError`` that reports it:

``hands an Accelerator``
    ``entry`` receives an object with ``process_index``, ``num_processes``,
    ``is_main_process`` and ``device`` (an ``accelerate.Accelerator``).
``runs on every rank``
    ``entry`` ran and returned on every one of ``num_processes`` processes,
    each with the arguments given to ``launch``.
``returns rank 0's result``
    ``launch`` returns what ``entry`` returned on rank 0.
``reports failures``
    When ``entry`` raises, ``launch`` raises too (a failed training is never
    reported as a success).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .invariants import require as _require


class ProbeFailure(RuntimeError):
    """Raised on purpose by `failing_entry`."""


def probe_entry(accelerator: Any, workdir: str, token: str, resume: bool = False) -> dict[str, Any]:
    """Record this process's view of the launch in ``workdir/rank-<i>.json``; return it.

    The last positional argument is the ``resume`` flag of the entry-point contract.
    """
    record = {
        "token": token,
        "rank": int(accelerator.process_index),
        "world": int(accelerator.num_processes),
        "is_main": bool(accelerator.is_main_process),
        "device": str(accelerator.device),
        "pid": os.getpid(),
    }
    path = Path(workdir) / f"rank-{record['rank']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return record


def failing_entry(accelerator: Any, token: str, resume: bool = False) -> None:
    """Raise `ProbeFailure` on every process."""
    raise ProbeFailure(f"deliberate failure ({token}) from the conformance kit")


def check_launcher(launcher: Any, *, name: str | None = None, accelerator_kwargs: Mapping[str, Any] | None = None,
                   workdir: str | os.PathLike | None = None, check_failures: bool = True) -> None:
    """Run every launcher check (see the module docstring)."""
    who = f"launcher {name or type(launcher).__name__!r}"
    kwargs = dict(accelerator_kwargs or {"mixed_precision": "no"})
    scratch = Path(tempfile.mkdtemp(prefix="flowforge-launch-", dir=workdir))
    token = scratch.name
    try:
        try:
            result = launcher.launch(probe_entry, str(scratch), token, False, accelerator_kwargs=kwargs)
        except Exception as exc:
            exc.add_note(f"(raised by {who} while the conformance kit checked 'runs on every rank')")
            raise
        files = sorted(scratch.glob("rank-*.json"))
        _require(bool(files), who, "runs on every rank",
                 "the training function never ran (no process wrote its record)")
        records = [json.loads(f.read_text()) for f in files]
        world = records[0]["world"]
        _require(world >= 1, who, "hands an Accelerator", f"num_processes is {world}")
        ranks = sorted(r["rank"] for r in records)
        _require(ranks == list(range(world)), who, "runs on every rank",
                 f"the training function returned on ranks {ranks}, expected every rank of 0..{world - 1}")
        _require(all(r["token"] == token for r in records), who, "runs on every rank",
                 "the training function did not receive the arguments given to launch()")
        _require(all(r["world"] == world for r in records), who, "hands an Accelerator",
                 "the processes disagree on num_processes")
        mains = [r["rank"] for r in records if r["is_main"]]
        _require(mains == [0], who, "hands an Accelerator",
                 f"is_main_process is true on ranks {mains}, expected only rank 0")
        _require(isinstance(result, Mapping) and result.get("rank") == 0 and result.get("token") == token,
                 who, "returns rank 0's result", f"launch() returned {result!r}, expected rank 0's return value")
        if check_failures:
            try:
                launcher.launch(failing_entry, token, False, accelerator_kwargs=kwargs)
            except BaseException as exc:  # noqa: BLE001 - any error is a reported failure
                if isinstance(exc, KeyboardInterrupt):
                    raise
            else:
                raise AssertionError(f"{who} violates 'reports failures': the training function raised on every "
                                     f"process, but launch() returned normally")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
