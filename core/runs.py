"""Loading a finished (or interrupted) run directory for sampling and evaluation.

``load_run(RUN_DIR)`` reads ``config.toml`` (the resolved config the run
wrote), applies ``--set`` style overrides (typically ``solver.*``), builds
every component through the registry, and loads the latest checkpoint's EMA
weights (or the raw weights). Problems a user can fix (not a run directory, no
checkpoint, a corrupt checkpoint, overrides that change the model) raise
`registry.ConfigError`, which the CLI prints and turns into exit status 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import registry
from registry import ConfigError

from . import checkpoint as ckpt
from .config import Experiment
from .config import load as load_config
from .build import Components
from .rundir import RunDir
from .device import pick_device  # noqa: F401 - public here since round 1


@attrs.define
class LoadedRun:
    """A run directory loaded for inference.

    Attributes:
        run_dir: the run directory's paths.
        exp: the resolved experiment (with any overrides applied).
        components: everything built from it (``components.model`` is `model`).
        model: the network in eval mode on `device`, with the chosen weights.
        weights: ``"ema"`` or ``"raw"``: which weights `model` holds.
        step: the optimizer step of the checkpoint.
        checkpoint: the checkpoint file loaded.
        device: where `model` lives.
    """

    run_dir: RunDir
    exp: Experiment
    components: Components
    model: nn.Module
    weights: str
    step: int
    checkpoint: Path
    device: torch.device

    @property
    def name(self) -> str:
        return self.exp.experiment.name


def load_experiment(root: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """The run's resolved experiment (``config.toml``) with `overrides` applied; ConfigError when there is none."""
    run_dir = RunDir(root)
    if not run_dir.root.is_dir():
        raise ConfigError(f"run directory not found: {run_dir.root}")
    if not run_dir.config.is_file():
        raise ConfigError(f"{run_dir.root} is not a flowforge run directory (no config.toml)")
    return load_config(run_dir.config, overrides)


def load_file(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """The resolved experiment of the experiment file `path` with `overrides` (`core.config.load`).

    For a plugin's command that reads experiment files (plugins import no config module directly).
    """
    return load_config(path, overrides)


def load_run(root: str | Path, overrides: Sequence[str] = (), *, ema: bool = True, device: str = "auto",
             checkpoint: str | Path | None = None) -> LoadedRun:
    """Load the run in `root` for sampling or evaluation (see the module docstring).

    Args:
        root: the run directory.
        overrides: ``KEY=VALUE`` strings applied to its config.toml, e.g. ``"solver.steps=8"``.
        ema: use the EMA weights (a run trained without EMA falls back to its raw weights, with a note).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        checkpoint: a specific checkpoint file (default: the newest in ``checkpoints/``).
    """
    from .pretrained import from_pretrained, is_pretrained
    from .build import build_components

    if checkpoint is None and is_pretrained(root):
        return from_pretrained(root, overrides, device=device)
    dev = pick_device(device)
    exp = load_experiment(root, overrides)
    run_dir = RunDir(root)
    path = Path(checkpoint) if checkpoint is not None else newest_checkpoint(run_dir)
    weights, tensors, state = ckpt.model_weights(path, ema)
    components = build_components(exp)
    model = components.model
    try:
        model.load_state_dict(tensors)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"checkpoint {path} does not match the model of {run_dir.config} with these overrides: "
                          f"{ckpt.mismatch_detail(exc)}") from None
    components.objective.load_state_dict(state.get("objective", {}))
    model.to(dev).eval().requires_grad_(False)
    return LoadedRun(run_dir=run_dir, exp=exp, components=components, model=model, weights=weights,
                     step=int(state["step"]), checkpoint=path, device=dev)


def train(file: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None, *,
          resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train the experiment `file` with the runner (`core.run.run`) and return its summary.

    The entry point for plugin tools that run experiments (a family's comparison table, a
    command): plugins reach the runner through this public loader, never through `core.run`.
    """
    from .run import run

    return run(file, overrides, out, resume=resume, overwrite=overwrite)


def newest_checkpoint(run_dir: RunDir | str | Path) -> Path:
    """The newest checkpoint file of a run directory; ConfigError when it has saved none."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    path = ckpt.latest(run_dir.checkpoints)
    if path is None:
        raise ConfigError(f"no checkpoint in {run_dir.checkpoints}: the run has not saved one yet "
                          f"(it saves at the end and every trainer.checkpoint_every steps)")
    return path


def build_solver(run: LoadedRun, mapping: Mapping[str, Any]) -> Any:
    """A solver built from `mapping` (``{"plugin": ..., options}``) with the run's spec, scheduler and path."""
    c = run.components
    try:
        return registry.build("solver", mapping, spec=c.spec, scheduler=c.scheduler, path=c.path)
    except ConfigError as exc:
        raise exc.within("solver") from None


def read_summary(root: str | Path) -> dict[str, Any]:
    """A run's summary.json, or {} when missing; ConfigError when unreadable."""
    path = RunDir(root).summary
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys; lists of tables (``[[metrics]]``) as ``key[i].sub``."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


def solver_overrides(solver: str | None = None, **options: Any) -> list[str]:
    """``--set`` strings for a solver choice: ``solver={plugin=...}`` (a fresh section) when `solver` is
    given, then ``solver.KEY=VALUE`` for every option that is not None."""
    out = [f'solver={{plugin = "{solver}"}}'] if solver else []
    for key, value in options.items():
        if value is not None:
            out.append(f"solver.{key}={toml_value(value)}")
    return out


def toml_value(value: Any) -> str:
    """`value` (str, bool, int, float, list, dict) as an inline TOML value: ``{"a" = [1, true]}``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


# --------------------------------------------------------------------------- tables and plots of results
def format_cell(value: Any) -> str:
    """A table cell: floats with 5 significant digits, None as an empty cell, the rest as text."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of `rows` (dicts) with the given `columns` (missing keys: empty cells)."""
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(esc(format_cell(row.get(c))) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], stem: str | Path,
                preamble: str = "") -> list[Path]:
    """Write `rows` as ``STEM.md`` (markdown, after `preamble`) and ``STEM.csv``; return both paths."""
    import csv

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text((preamble.rstrip() + "\n\n" if preamble else "") + markdown_table(rows, columns))
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            value = [row.get(c) for c in columns]
            writer.writerow(["" if v is None else (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v)
                             for v in value])
    return [md, csv_path]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
