"""Checkpoints: written atomically, loaded as data (``weights_only=True``), never as code.

A checkpoint is a dict of tensors and plain Python values. Files are named
``step-00001000.pt`` inside ``checkpoints/``; the newest readable one is the
resume point.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from registry import ConfigError

_NAME = re.compile(r"^step-(\d+)\.pt$")


@contextlib.contextmanager
def folder_atomic(folder: str | Path, tag: str = "tmp") -> Iterator[Path]:
    """Yield an empty temporary sibling of `folder` to fill; when the block ends it replaces `folder` (an
    existing one is removed first), and when the block raises it is removed: a reader sees the old folder
    or the whole new one."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some file systems refuse directory fsync
        pass
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint as data. ConfigError (exit 2) when missing, corrupt or not data-only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"checkpoint {path} is corrupt or not a flowforge checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ConfigError(f"checkpoint {path} is not a flowforge checkpoint (no 'step' entry)")
    return state


def load_newest_readable(directory: str | Path, report: Any = None) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint in `directory` that loads, or None when there is none.

    Unreadable newer files (a crash on a file system without atomic rename, a disk error) are
    skipped, each one named through ``report(message)``; ConfigError when none of them loads.
    """
    found = list_checkpoints(directory)
    failures = []
    for _, path in reversed(found):
        try:
            state = load(path)
        except ConfigError as exc:
            failures.append(str(exc))
            if report is not None:
                report(f"flowforge: skipping unreadable checkpoint: {exc}")
            continue
        if failures and report is not None:
            report(f"flowforge: resuming from {path.name}, the newest readable checkpoint")
        return path, state
    if failures:
        raise ConfigError("no readable checkpoint in " + str(directory) + ": " + "; ".join(failures))
    return None


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries `save_atomic` leaves when killed mid-write (``.NAME.tmp-PID``); return them.

    Call it only while holding the run directory's lock (no live writer).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def path_for(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune(directory: str | Path, keep: int, protect: tuple[Path, ...] = ()) -> None:
    """Delete all but the newest `keep` checkpoints (never those in `protect`)."""
    found = list_checkpoints(directory)
    for _, p in found[: max(0, len(found) - keep)]:
        if p not in protect:
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, Python, NumPy) as checkpointable data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def mismatch_detail(exc: BaseException, lines: int = 6, width: int = 240) -> str:
    """The useful part of a ``load_state_dict`` error: its detail lines (missing / unexpected keys, size
    mismatches), each cut to `width` characters, at most `lines` of them, not just the heading."""
    text = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = [line for line in text if not line.startswith("Error(s) in loading")] or text
    shown = [line if len(line) <= width else line[:width] + " ..." for line in detail[:lines]]
    more = f"\n  ... and {len(detail) - lines} more" if len(detail) > lines else ""
    return "\n  " + "\n  ".join(shown) + more


def model_weights(path: Path, ema: bool = True) -> tuple[str, Mapping[str, torch.Tensor], dict[str, Any]]:
    """``(which, tensors, state)`` of the checkpoint file `path`: its EMA weights (``which = "ema"``) when
    `ema` and it has them, else its raw ones (``"raw"``, with a note when EMA was asked for); ConfigError
    when it holds no model weights."""
    state = load(path)
    if ema and state.get("ema") is not None:
        return "ema", state["ema"], state
    if ema:
        print(f"flowforge: {path} holds no EMA weights (trainer.ema_decay = 0); using the raw weights",
              file=sys.stderr)
    tensors = state.get("model")
    if not isinstance(tensors, Mapping):
        raise ConfigError(f"checkpoint {path} has no model weights")
    return "raw", tensors, state
