"""Run an experiment: ``python -m core.run FILE.toml [--set k=v ...] [--out DIR] [--resume]``.

Validates the whole file first (errors exit with status 2 and no traceback),
writes the run directory's config.toml and env.json, and hands the training
entry point to the experiment's launcher.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import registry
from registry import ConfigError

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="experiment TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. --set trainer.steps=100 (repeatable; values are TOML)")
    parser.add_argument("--out", help="run directory (default: runs/<experiment.name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the run directory")
    parser.add_argument("--smoke", action="store_true",
                        help="quick look: cap every phase (steps, evaluation, metric budgets; see core/smoke.py)")


def run(file: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None,
        resume: bool = False, overwrite: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Validate, prepare the run directory and launch training; return the summary.

    A file with ``[[stages]]`` runs each stage in ``OUT/<k>-<name>/`` (base file
    plus the stage's overrides, ``{previous}`` = the previous stage's directory)
    and returns ``{"stages": [summary, ...]}``; with ``--resume``, finished
    stages are skipped and an interrupted one continues.
    """
    from . import config

    raw = config.read_toml(file)
    try:
        raw = config.apply_overrides(raw, overrides)
    except ConfigError as exc:
        raise exc.within(file=str(file)) from None
    if smoke:
        from .smoke import apply_smoke

        raw = apply_smoke(raw, str(file))
    base, stages = config.split_stages(raw, str(file))
    if not stages:
        return run_config(config.resolve(base, file=str(file)), out, resume, overwrite)
    for stage in stages:  # validate every stage before running any
        config.resolve(config.stage_config(base, stage, "{previous}"), file=str(file))
    first = config.resolve(config.stage_config(base, stages[0], None), file=str(file))
    root = Path(out) if out else Path("runs") / first.experiment.name
    if root.exists() and any(root.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"run directory {root} already holds a run; pass --resume, --overwrite or --out DIR")
    summaries, previous = [], None
    for index, stage in enumerate(stages):
        stage_dir = root / f"{index}-{stage.name}"
        exp = config.resolve(config.stage_config(base, stage, previous), file=str(file))
        if resume and (stage_dir / "summary.json").exists():
            import json

            summaries.append(json.loads((stage_dir / "summary.json").read_text()))
        else:
            print(f"stage {index} ({stage.name}) -> {stage_dir}")
            has_run = (stage_dir / "config.toml").exists()
            summaries.append(run_config(exp, stage_dir, resume=resume and has_run, overwrite=overwrite or not has_run))
        previous = str(stage_dir)
    return {"stages": summaries}


def run_config(exp: Any, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run one validated `core.config.Experiment`."""
    from . import config
    from .rundir import RunDir
    from .trainer import train_entry

    out = Path(out) if out else Path("runs") / exp.experiment.name
    run_dir = RunDir(out)
    try:
        launcher = registry.build("launcher", exp.components["launcher"])
    except ConfigError as exc:
        raise exc.within("launcher", file=exp.file) from None
    created = _not_yet_there(out)
    run_dir.prepare(resume=resume, overwrite=overwrite)
    text = config.dumps(exp)
    run_dir.write_config(text)
    run_dir.write_env()
    # Precision (autocast, fp16 loss scaling) is the trainer's business: one Accelerator
    # configuration per process, whatever the experiment (accelerate's state is a singleton).
    accelerator_kwargs: dict[str, Any] = {}
    try:
        return launcher.launch(train_entry, exp.to_dict(), exp.file, str(out), resume, accelerator_kwargs=accelerator_kwargs)
    except ConfigError:
        if not resume:
            _discard_unstarted(run_dir, created)
        raise


def _not_yet_there(out: Path) -> Path | None:
    """The topmost missing folder of `out` (what preparing the run directory creates), or None."""
    created = None
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"--out {out}: {folder} is a file, not a directory; choose another run directory")
            break
        created = folder
    return created


def _discard_unstarted(run_dir: Any, created: Path | None) -> None:
    """After a build error (a ConfigError before the first step), remove what this run wrote.

    Only a run that logged nothing and saved no checkpoint is removed, so the corrected re-run needs no --overwrite.
    """
    import shutil

    if run_dir.metrics.exists() or (run_dir.checkpoints.is_dir() and any(run_dir.checkpoints.iterdir())):
        return
    for path in (run_dir.config, run_dir.env):
        path.unlink(missing_ok=True)
    for folder in (run_dir.checkpoints, run_dir.samples):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if created is not None and created.is_dir() and not any(created.rglob("*")):
        shutil.rmtree(created)


def report(exc: BaseException) -> int:
    """Print a user-facing error and return the exit status."""
    from .trainer import NonFiniteLossError

    if isinstance(exc, ConfigError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, NonFiniteLossError):
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted; continue with --resume (steps since the last checkpoint are lost)", file=sys.stderr)
        return 130
    raise exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.run", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = run(args.file, args.overrides, args.out, args.resume, args.overwrite, args.smoke)
    except (ConfigError, KeyboardInterrupt) as exc:
        return report(exc)
    except Exception as exc:  # noqa: BLE001
        from .trainer import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            return report(exc)
        raise
    _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    if not summary:
        return
    if "stages" in summary:
        for stage in summary["stages"]:
            _print_summary(stage)
        return
    print(f"done: {summary.get('steps')} steps in {summary.get('train_wall_time_s')} s")
    for group in ("metrics", "untrained", "floor"):
        values = summary.get(group) or {}
        if values:
            print(f"  {group:9s} " + "  ".join(f"{k}={v:.5g}" for k, v in values.items()))


if __name__ == "__main__":
    sys.exit(main())
