"""``flowforge sample RUN_DIR``: draw samples from a run's latest checkpoint.

Loads the EMA weights (``--no-ema``: the raw weights), integrates with the
run's solver or another one (``--solver``, ``--steps``, ``--method``, or any
``--set solver.KEY=VALUE``), with classifier-free guidance scale ``--guidance``,
and writes a picture through the data source's ``render()`` (a PNG grid or a
scatter plot) and, with ``--npz``, the samples themselves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

NAME = "sample"
HELP = "draw samples from a run's checkpoint (PNG grid or scatter plot, optional .npz)"


def add_solver_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``sample`` and ``eval``: the run, weights, overrides and device."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by flowforge run")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA ones")
    parser.add_argument("--checkpoint", help="a checkpoint file (default: the newest in RUN_DIR/checkpoints)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's config.toml, e.g. --set solver.steps=8 (repeatable)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when visible), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per solver batch (default: eval.batch_size)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_solver_arguments(parser)
    parser.add_argument("--solver", help="solver plugin (replaces the run's [solver] section)")
    parser.add_argument("--steps", type=int, help="solver steps (solver.steps)")
    parser.add_argument("--method", help="solver method (solver.method), e.g. euler, midpoint, heun, rk4")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the run's eval.guidance_scale)")
    parser.add_argument("-n", "--num", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the labels (default 0)")
    parser.add_argument("--labels", help="class labels, comma-separated, cycled to -n (default: uniform draws)")
    parser.add_argument("--out", help="output file stem (default RUN_DIR/samples/sample-<settings>)")
    parser.add_argument("--npz", action="store_true", help="also write the samples (x, y) to OUT.npz")


def main(args: argparse.Namespace) -> int:
    from core.data import generator as make_generator
    from core.generate import generate
    from core.runs import load_run, solver_overrides
    from registry import ConfigError

    overrides = [*solver_overrides(args.solver, steps=args.steps, method=args.method), *args.overrides]
    run = load_run(args.run_dir, overrides, ema=args.ema, device=args.device, checkpoint=args.checkpoint)
    c = run.components
    if not c.can_generate:
        raise ConfigError(f"{run.run_dir.config}: this experiment has no [solver] and [path]; it cannot generate")
    if args.num < 1:
        raise ConfigError(f"-n expects a positive number of samples, got {args.num}")
    guidance = run.exp.eval.guidance_scale if args.guidance is None else args.guidance
    labels = None
    if args.labels:
        if c.spec.num_classes <= 0:
            raise ConfigError("--labels: this data set has no class labels")
        try:
            given = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--labels expects comma-separated integers, got {args.labels!r}") from None
        if not given or not all(0 <= v < c.spec.num_classes for v in given):
            raise ConfigError(f"--labels expects class labels in 0..{c.spec.num_classes - 1}, got {args.labels!r}")
        labels = torch.tensor(given).repeat(-(-args.num // len(given)))[: args.num]
    batch, nfe = generate(c, run.model, args.num, make_generator(args.seed, "sample-cli"), labels=labels,
                          guidance_scale=guidance, batch_size=args.batch_size or run.exp.eval.batch_size,
                          device=run.device)
    solver = run.exp.components["solver"]
    parts = [str(solver["plugin"])]
    if "method" in solver:
        parts.append(str(solver["method"]))
    if "steps" in solver:
        parts.append(f"{solver['steps']}steps")
    tag = "-".join(parts)
    stem = Path(args.out) if args.out else run.run_dir.samples / f"sample-{tag}-w{guidance:g}-seed{args.seed}-{run.weights}"
    if stem.suffix in (".png", ".npz"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = list(c.data.render(batch, str(stem)))
    if args.npz:
        arrays = {k: v.cpu().numpy() for k, v in batch.items()}
        np.savez_compressed(f"{stem}.npz", **arrays)
        files.append(f"{stem}.npz")
    x = batch["x"]
    if x.is_floating_point() and not torch.isfinite(x).all():
        print(f"warning: {int((~torch.isfinite(x)).sum())} non-finite values in the samples")
    info = {"run": str(run.run_dir.root), "step": run.step, "weights": run.weights, "solver": solver,
            "nfe": nfe, "guidance_scale": guidance, "seed": args.seed, "num": args.num, "files": files}
    print(json.dumps(info))
    if not files:
        print(f"note: the data source {run.exp.components['data']['plugin']!r} renders no pictures; use --npz")
    return 0
