"""Run an experiment: ``python -m core.run FILE.toml [--set k=v ...] [--out DIR] [--resume]``.

Validates the whole file first (errors exit with status 2 and no traceback) and
hands `run_entry` to the experiment's launcher. One writer: global rank 0 alone
locks and prepares the run directory, writes config.toml, env.json, metrics,
checkpoints and the summary, and prints; the other ranks wait for it and read.

Exit status: 0 done, 1 a failed run (non-finite loss, a rank that died), 2 a
configuration or run-directory error, ``128 + N`` stopped by signal N after
writing a checkpoint (SIGINT 130, SIGUSR1 138, SIGUSR2 140, SIGTERM 143).
"""

from __future__ import annotations

import argparse
import os
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
    return run_stages(base, stages, str(file), out, resume, overwrite)


def run_stages(base: dict[str, Any], stages: Sequence[Any], file: str, out: str | Path | None, resume: bool,
               overwrite: bool) -> dict[str, Any]:
    """Run ``[[stages]]`` one after the other (see `run`); every stage is resolved, once, before any runs."""
    from . import config

    first = config.resolve(config.stage_config(base, stages[0], None), file=file)
    root = Path(out) if out else Path("runs") / first.experiment.name
    dirs = [root / f"{index}-{stage.name}" for index, stage in enumerate(stages)]
    exps = [first, *(config.resolve(config.stage_config(base, stage, str(previous)), file=file)
                     for stage, previous in zip(stages[1:], dirs))]
    primary = _hosts_rank_zero(launcher_of(first))
    if primary and root.exists() and any(root.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"run directory {root} already holds a run; pass --resume, --overwrite or --out DIR")
    summaries = []
    for index, (stage, exp, stage_dir) in enumerate(zip(stages, exps, dirs)):
        if resume and (stage_dir / "summary.json").exists():
            import json

            summaries.append(json.loads((stage_dir / "summary.json").read_text()))
            continue
        if primary:
            print(f"stage {index} ({stage.name}) -> {stage_dir}")
        has_run = (stage_dir / "config.toml").exists()
        summaries.append(run_config(exp, stage_dir, resume=resume and has_run, overwrite=overwrite or not has_run))
    return {"stages": summaries}


def launcher_of(exp: Any) -> Any:
    """The experiment's launcher, built from the config `resolve` structured (the section's default when absent)."""
    from .build import build

    if "launcher" not in exp.components:
        raise ConfigError(f"no [launcher] section, and no installed launcher declares itself the default; "
                          f"add [launcher] with plugin = one of: {', '.join(registry.available('launcher')) or '(none)'}",
                          ("launcher",), exp.file)
    return build("launcher", "launcher", exp.components["launcher"], exp.file, configs=exp.configs)


def run_config(exp: Any, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run one validated `core.config.Experiment`; return the summary (None on ranks other than 0).

    The process that will host global rank 0 checks the run directory first (read-only: a clear
    error before any worker starts); the writing itself happens in `run_entry`, on global rank 0.
    """
    from .rundir import RunDir

    out = Path(out) if out else Path("runs") / exp.experiment.name
    launcher = launcher_of(exp)
    run_dir = RunDir(out)
    created = _not_yet_there(out)
    # after a build error, remove what this run wrote, never what an earlier or a live run wrote
    writer = (_hosts_rank_zero(launcher) or os.environ.get("RANK", "0") == "0") and not run_dir.config.exists()
    if _hosts_rank_zero(launcher):
        run_dir.check(resume=resume, overwrite=overwrite)
    # Precision (autocast, fp16 loss scaling) is the trainer's business: one Accelerator
    # configuration per process, whatever the experiment (accelerate's state is a singleton).
    accelerator_kwargs: dict[str, Any] = {}
    try:
        return launcher.launch(run_entry, exp, str(out), overwrite, resume, accelerator_kwargs=accelerator_kwargs)
    except ConfigError:
        if writer and not resume:
            _discard_unstarted(run_dir, created)
        raise


def _hosts_rank_zero(launcher: Any) -> bool:
    """Whether this process will be (or start) global rank 0 and no peer is running yet.

    False inside ``torchrun`` / ``accelerate launch`` workers (rank 0 checks there, after the
    rendezvous, so that a refusal reaches every rank) and on machines other than machine 0.
    """
    if "WORLD_SIZE" in os.environ and ("RANK" in os.environ or "LOCAL_RANK" in os.environ):
        return False
    return bool(getattr(launcher, "hosts_rank_zero", True))


def run_entry(accelerator: Any, exp: Any, out: str, overwrite: bool, resume: bool) -> dict[str, Any] | None:
    """What every launcher runs on every process (picklable, top-level), with the structured experiment.

    `exp` is the `core.config.Experiment` the launching process resolved (pickled to spawned or
    submitted workers): it is not validated again.

    Global rank 0 prepares the run directory (lock, overwrite, config.toml, env.json) while the
    others wait for its outcome (`open_shared`); then every rank trains. Signals stop the run at
    the next step boundary with a checkpoint (`core.signals`). A job restarted with
    ``resume = True`` (a requeue) resumes: ``overwrite`` applies to the first start only.
    """
    from . import signals
    from .config import dumps
    from .rundir import RunDir
    from .trainer import Trainer

    run_dir = RunDir(out)
    with signals.stop_on_signals():
        open_shared(accelerator, run_dir, dumps(exp), resume=resume, overwrite=overwrite and not resume)
        try:
            summary = Trainer(accelerator, exp, run_dir, resume=resume).fit()
        finally:
            run_dir.release_lock()
    return summary if accelerator.is_main_process else None


def open_shared(accelerator: Any, run_dir: Any, config_text: str, *, resume: bool, overwrite: bool) -> None:
    """Global rank 0 prepares `run_dir` and writes config.toml and env.json; every rank gets its outcome.

    The broadcast of the outcome is the barrier: the other ranks wait for it (bounded by the process
    group's timeout) and raise rank 0's error, so a refusal ends every rank with rank 0's message.
    """
    error: BaseException | None = None
    outcome = ("ok", "")
    if accelerator.is_main_process:
        try:
            run_dir.prepare(resume=resume, overwrite=overwrite)
            run_dir.write_config(config_text, resume=resume)
            run_dir.write_env()
        except ConfigError as exc:
            error, outcome = exc, ("config", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to every rank, re-raised on rank 0
            error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        box = [outcome]
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RuntimeError(f"rank {accelerator.process_index}: no word from rank 0 about the run directory "
                               f"{run_dir.root} ({first[:300]}); see rank 0's output") from None
        outcome = box[0]
    if error is not None:
        if outcome[0] == "error" and accelerator.is_main_process:
            run_dir.release_lock()
        raise error
    if outcome[0] == "config":
        raise ConfigError(f"rank 0 refused the run directory: {outcome[1]}")
    if outcome[0] == "error":
        raise RuntimeError(f"rank 0 could not prepare the run directory {run_dir.root}: {outcome[1]}")


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
    """Print a user-facing error and return the exit status (see docs/launching.md)."""
    from .signals import StopRequested
    from .errors import NonFiniteLossError

    if isinstance(exc, ConfigError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, NonFiniteLossError):
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, StopRequested):
        print(f"flowforge: {exc}", file=sys.stderr)
        return exc.exit_status
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted; continue with --resume (steps since the last checkpoint are lost)", file=sys.stderr)
        return 130
    raise exc


def main(argv: Sequence[str] | None = None) -> int:
    from .signals import StopRequested
    from .errors import NonFiniteLossError

    parser = argparse.ArgumentParser(prog="python -m core.run", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = run(args.file, args.overrides, args.out, args.resume, args.overwrite, args.smoke)
    except (ConfigError, KeyboardInterrupt, NonFiniteLossError, StopRequested) as exc:
        return report(exc)
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
