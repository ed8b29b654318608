"""The run directory (DESIGN.md): config.toml, env.json, metrics.jsonl, summary.json,
checkpoints/ and samples/, plus ``run.lock`` while a run writes into it.

One writer: global rank 0 alone prepares and writes the directory (`RunDir.prepare`,
`open_shared`); the other ranks wait for its outcome and only read.

The lock file holds ``{"pid", "host", "started", "job"}`` of the writing process. It is
stale when its host is this host and its process is gone (or the pid now belongs to a
process started later); a stale lock is taken over with a message. A live lock makes
a new run, ``--overwrite`` and ``--resume`` refuse with the owner's pid and host. A
requeued job (same ``SLURM_JOB_ID``) takes over its own previous lock.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import math
import os
import platform
import shutil
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from registry import ConfigError


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


LOCK_NAME = "run.lock"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux ``/proc``), to tell a reused pid from the lock's owner."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def lock_is_stale(info: dict[str, Any]) -> bool:
    """Whether the lock `info` belongs to a process that is gone (checkable on its own host only)."""
    if info.get("job") and info.get("job") == _job_id():
        return True  # this job's previous attempt (a requeue)
    if info.get("host") != socket.gethostname():
        return False
    pid = int(info.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return True
    started = info.get("proc_start")
    return started is not None and _process_start(pid) not in (None, started)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old_text: str, new_text: str) -> dict[str, list[Any]]:
    """``{key path: [old, new]}`` for every value that differs between two config.toml texts."""
    try:
        old, new = _flatten(tomllib.loads(old_text)), _flatten(tomllib.loads(new_text))
    except tomllib.TOMLDecodeError:
        return {"(config.toml)": [old_text, new_text]}
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


class RunDir:
    """Paths and writers of one run's directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.toml"
        self.env = self.root / "env.json"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.lock_file = self.root / LOCK_NAME
        self.resume_log = self.root / "resume_log.jsonl"
        self._locked = False
        #: `core.interfaces.Logger` objects that receive every `log` record (the trainer sets them on rank 0)
        self.loggers: list[Any] = []

    # -- the lock -------------------------------------------------------------------
    def read_lock(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.lock_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": -1, "host": socket.gethostname()}  # half-written by a killed process: stale

    def check_not_live(self, action: str) -> None:
        """ConfigError when another live process holds the lock (`action` names what is refused)."""
        info = self.read_lock()
        mine = info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()
        if info is not None and not mine and not lock_is_stale(info):
            raise ConfigError(
                f"{action}: run directory {self.root} is in use by pid {info.get('pid')} on host "
                f"{info.get('host')} (since {info.get('started')}); wait for it to end or stop it. If that run "
                f"is gone (another host cannot be checked), delete {self.lock_file}")

    def acquire_lock(self) -> None:
        """Create ``run.lock`` for this process; take over a stale one; ConfigError on a live one."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": _job_id(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "proc_start": _process_start(os.getpid())}
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                old = self.read_lock()
                if old is None:
                    continue
                self.check_not_live("refused")
                print(f"flowforge: removing the stale lock of pid {old.get('pid')} on {old.get('host')} "
                      f"(that process is gone)", file=sys.stderr)
                self.lock_file.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(info) + "\n")
            self._locked = True
            return
        raise ConfigError(f"could not take the lock {self.lock_file} (another run keeps creating it)")

    def release_lock(self) -> None:
        """Remove ``run.lock`` if this process holds it."""
        if self._locked:
            info = self.read_lock()
            if info and info.get("pid") == os.getpid():
                self.lock_file.unlink(missing_ok=True)
            self._locked = False

    def has_run(self) -> bool:
        return self.config.exists() or (self.checkpoints.is_dir() and any(self.checkpoints.iterdir()))

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Read-only: ConfigError when `prepare` would refuse (a live run, a run in the way, nothing to resume)."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"run directory {self.root} exists and is not a directory")
        if self.has_run() and not resume and not overwrite:
            raise ConfigError(
                f"run directory {self.root} already holds a run; pass --resume to continue it, "
                f"--overwrite to replace it, or --out DIR to choose another directory")
        if resume and not self.has_run():
            raise ConfigError(f"--resume: no run to resume in {self.root} (no config.toml or checkpoints)")
        self.check_not_live("--resume" if resume else "--overwrite" if overwrite else "a new run")

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Take the lock and create the folders; refuse to mix a new run into an old one.

        ``overwrite`` empties the directory (keeping the lock); ``resume`` removes the temporaries a
        killed checkpoint write left. On a refusal nothing is left behind (not even the lock).
        """
        self.check(resume=resume, overwrite=overwrite)
        existed = self.root.exists()
        self.acquire_lock()
        try:
            self.check(resume=resume, overwrite=overwrite)  # again, under the lock
            if overwrite and self.has_run():
                for entry in self.root.iterdir():
                    if entry.name != LOCK_NAME:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            if resume:
                from .checkpoint import remove_stale_temporaries

                stale = remove_stale_temporaries(self.checkpoints)
                self.summary.with_suffix(".json.tmp").unlink(missing_ok=True)
                if stale:
                    print(f"flowforge: removed {len(stale)} stale checkpoint temporar{'y' if len(stale) == 1 else 'ies'} "
                          f"({', '.join(p.name for p in stale)})", file=sys.stderr)
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self.samples.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.release_lock()
            if not existed and self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()
            raise

    def write_config(self, text: str, resume: bool = False) -> dict[str, list[Any]]:
        """Write config.toml; on a resume whose config differs, log ``{key: [old, new]}`` to resume_log.jsonl.

        Returns the changes (empty when none).
        """
        changes: dict[str, list[Any]] = {}
        if resume and self.config.exists():
            changes = config_changes(self.config.read_text(), text)
            if changes:
                entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}
                with self.resume_log.open("a") as fh:
                    fh.write(json.dumps(_jsonable(entry)) + "\n")
                print("flowforge: --resume changes " + ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())
                      + f" (recorded in {self.resume_log.name})")
        tmp = self.config.with_suffix(".toml.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)
        return changes

    def truncate_metrics(self, step: int) -> int:
        """Drop the metrics.jsonl records logged after `step` (a resume repeats them) and torn lines; return how many."""
        if not self.metrics.exists():
            return 0
        kept, dropped = [], 0
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                dropped += bool(line.strip())
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = self.metrics.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.metrics)
        return dropped

    def write_env(self) -> None:
        """Versions of Python, torch and every flowforge plugin distribution."""
        import torch

        dists: dict[str, str] = {}
        for ep in metadata.entry_points(group="flowforge.plugins"):
            if ep.dist is not None:
                dists[ep.dist.name] = ep.dist.version
        info = {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cpu_count": os.cpu_count(),
            "plugins": dists,
        }
        for name in ("accelerate", "torchmetrics", "pluggy", "attrs", "cattrs", "numpy"):
            try:
                info[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        self.env.write_text(json.dumps(info, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` to metrics.jsonl and hand it to every logger (``[[loggers]]``)."""
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")
        if self.loggers:
            values = {k: v for k, v in record.items() if k != "step"}
            for logger in self.loggers:
                logger.log(int(record.get("step", 0)), values)

    def close_loggers(self) -> None:
        """Close every logger (each once), the first error raised after all are closed."""
        loggers, self.loggers = self.loggers, []
        errors = []
        for logger in loggers:
            try:
                logger.close()
            except Exception as exc:  # noqa: BLE001 - close the others first
                errors.append(exc)
        if errors:
            raise errors[0]

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        os.replace(tmp, self.summary)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
