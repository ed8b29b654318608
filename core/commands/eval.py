"""``flowforge eval RUN_DIR``: the run's metrics over a sweep of solvers, evaluation counts and guidance scales.

Every point of the sweep (the product of ``--solver`` x each ``--sweep KEY=...``
x ``--guidance``; ``--steps`` and ``--method`` are shorthands for
``--sweep steps=...`` and ``--sweep method=...``) generates ``-n`` samples from
the same noise (common random numbers, so differences are the solver's) and
feeds them to the experiment's sample metrics, or to those named with
``--metric``. Without any sweep option, a solver with a ``steps`` option is
swept over a quarter, a half, one and two times the run's steps.

Each point, and the data floor, is evaluated ``--repeats R`` times (default 3)
with the noise and held-out seeds ``seed, seed + 1, ...``; the table gives the
mean and its standard error ``se = s / sqrt(R)`` (s the sample standard
deviation over the repeats) as ``METRIC`` and ``METRIC_se``. A model that
scores "below the floor" by less than the two standard errors is not better
than the data.

Writes ``OUT/eval.md`` and ``OUT/eval.csv`` (one row per point: the settings,
model evaluations per sample, every metric, seconds) and ``OUT/eval.png``
(each metric against model evaluations, the data-vs-data floor dashed), and
``OUT/eval.json`` with everything. ``OUT`` defaults to ``RUN_DIR/eval``.
``--input1 A --input2 B`` scores image folders or npz archives instead
(`core.commands.eval_inputs`).
Model metrics (likelihoods, zero-shot accuracy) do not depend on the sampler
and are computed once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .sample import add_solver_arguments

NAME = "eval"
HELP = "evaluate a run's metrics over solvers, evaluation counts and guidance scales (table and plot)"


def _list(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval_inputs import add_input_arguments

    add_solver_arguments(parser, run_optional=True)
    add_input_arguments(parser)
    parser.add_argument("--solver", type=_list(str), default=None, help="solver plugins to compare, comma-separated")
    parser.add_argument("--steps", type=_list(int), default=None, help="solver steps, comma-separated, e.g. 4,8,16,32")
    parser.add_argument("--method", type=_list(str), default=None, help="solver methods, e.g. euler,midpoint,rk4")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="sweep any solver option over TOML values (repeatable)")
    parser.add_argument("--guidance", type=_list(float), default=None,
                        help="classifier-free guidance scales, comma-separated (default: the run's eval.guidance_scale)")
    parser.add_argument("-n", "--num-samples", type=int, default=None,
                        help="generated (and held-out) examples per point (default: the run's eval.num_samples)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise (default: the run's seed)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="evaluations per point (seeds seed, seed+1, ...) for the mean and its standard error")
    parser.add_argument("--metric", action="append", default=[], metavar="PLUGIN|{TOML}",
                        help="evaluate this metric instead of the run's (repeatable): a plugin name, or an inline "
                             "TOML table such as '{plugin = \"NAME\", KEY = VALUE}' (flowforge plugins lists the metrics)")
    parser.add_argument("--no-floor", dest="floor", action="store_false", help="skip the data-vs-data floor")
    parser.add_argument("--out", help="output folder (default RUN_DIR/eval)")


def _parse_metric(text: str) -> dict[str, Any]:
    from core.config import tomllib
    from registry import ConfigError

    text = text.strip()
    if not text.startswith("{"):
        return {"plugin": text}
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--metric {text!r}: not a TOML inline table ({exc})") from None
    if "plugin" not in value:
        raise ConfigError(f"--metric {text!r}: the table needs a plugin key")
    return value


def _sweep_axes(args: argparse.Namespace, solver: dict[str, Any]) -> dict[str, list[Any]]:
    from core.config import parse_override
    from registry import ConfigError

    axes: dict[str, list[Any]] = {}
    for text in args.sweep:
        key, sep, values = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sweep expects KEY=V1,V2,..., got {text!r}")
        axes[key.strip()] = [parse_override(f"v={v.strip()}")[1] for v in values.split(",") if v.strip()]
    if args.steps:
        axes["steps"] = args.steps
    if args.method:
        axes["method"] = args.method
    if not axes and not args.solver and isinstance(solver.get("steps"), int):
        s = solver["steps"]
        axes["steps"] = sorted({max(1, s // 4), max(1, s // 2), s, 2 * s})
    return axes


def mean_and_se(results: list[dict[str, float]]) -> dict[str, float]:
    """``{k: mean over results, k_se: s / sqrt(R)}`` for R >= 2 results (s: sample standard deviation);
    just the values for R = 1."""
    if len(results) == 1:
        return dict(results[0])
    out: dict[str, float] = {}
    for key in results[0]:
        values = [float(r[key]) for r in results]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        out[key], out[f"{key}_se"] = mean, math.sqrt(var / len(values))
    return out


def sweep(run: Any, axes: dict[str, list[Any]], solvers: list[str] | None, guidances: list[float], n: int, seed: int,
          batch_size: int, log=print, repeats: int = 1) -> list[dict[str, Any]]:
    """Evaluate the run's sample metrics at every point of the sweep, `repeats` times each (seeds seed,
    seed + 1, ...); one dict per point with the mean of each metric and, for repeats > 1, its standard error."""
    import attrs

    from core.data import generator as make_generator
    from core.generate import evaluate, generate
    from core.runs import build_solver

    base = dict(run.exp.components["solver"])
    rows = []
    keys = list(axes)
    for plugin in solvers or [base["plugin"]]:
        mapping0 = base if plugin == base["plugin"] else {"plugin": plugin}
        for values in itertools.product(*(axes[k] for k in keys)):
            mapping = {**mapping0, **dict(zip(keys, values))}
            components = attrs.evolve(run.components, solver=build_solver(run, mapping))
            _, nfe = generate(components, run.model, 1, make_generator(seed, "eval-nfe"), device=run.device)
            for w in guidances:
                t0 = time.perf_counter()
                result = mean_and_se([evaluate(components, run.model, n, seed + r, guidance_scale=w,
                                               batch_size=batch_size, device=run.device) for r in range(repeats)])
                row = {"solver": plugin, **dict(zip(keys, values)), "guidance": w, "nfe": nfe, **result,
                       "seconds": round(time.perf_counter() - t0, 3)}
                log("  " + "  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
                rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], metric_keys: list[str], setting_keys: list[str], floor: dict[str, float],
         path: Path, title: str) -> Path:
    """Each metric against model evaluations (or guidance, when only that varies), one line per setting."""
    from core.runs import pyplot

    plt = pyplot()
    x_key = "nfe"
    if len({r["nfe"] for r in rows}) == 1 and len({r["guidance"] for r in rows}) > 1:
        x_key = "guidance"
    group_keys = [k for k in setting_keys if k != x_key and k != "steps" and len({str(r.get(k)) for r in rows}) > 1]
    cols = min(3, max(1, len(metric_keys)))
    nrows = max(1, math.ceil(len(metric_keys) / cols))
    fig, axs = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), dpi=100, squeeze=False)
    for ax, key in zip(axs.flat, metric_keys):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            label = ", ".join(f"{k}={r.get(k)}" for k in group_keys) or "run"
            groups.setdefault(label, []).append(r)
        for label, items in groups.items():
            pts = sorted((r[x_key], r[key], r.get(f"{key}_se", 0.0)) for r in items
                         if isinstance(r.get(key), (int, float)))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[2 * p[2] for p in pts], marker="o",
                            capsize=3, label=label)
        if key in floor:
            ax.axhline(floor[key], ls="--", color="grey", label="data vs data")
            if floor.get(f"{key}_se"):
                ax.axhspan(floor[key] - 2 * floor[f"{key}_se"], floor[key] + 2 * floor[f"{key}_se"], color="grey",
                           alpha=0.15)
        if x_key == "nfe" and len({r["nfe"] for r in rows}) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("model evaluations per sample" if x_key == "nfe" else "guidance scale")
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axs.flat)[len(metric_keys):]:
        ax.axis("off")
    handles, labels = axs.flat[0].get_legend_handles_labels()
    if handles:
        axs.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _cli_metrics(specs: list[str], c: Any) -> dict[str, Any]:
    """The ``--metric`` entries, built with the run's context (spec, data, scheduler, path, objective, kinds)."""
    import registry
    from core.generate import metric_names
    from registry import ConfigError

    entries = [_parse_metric(m) for m in specs]
    metrics = {}
    for index, (name, entry) in enumerate(zip(metric_names(entries), entries)):
        try:
            metrics[name] = registry.build("metric", entry, spec=c.spec, data=c.data, scheduler=c.scheduler,
                                           path=c.path, objective=c.objective, **c.extras)
        except ConfigError as exc:
            raise exc.within(f"--metric[{index}]") from None
    return metrics


def _preamble(run: Any, n: int, seed: int, repeats: int, floor_values: dict[str, float],
              model_values: dict[str, float]) -> str:
    """The text above eval.md's table: the run, the sample counts and seeds, the floor, the model metrics."""
    repeated = (f"mean and standard error (`_se`) over {repeats} seeds ({seed} to {seed + repeats - 1})"
                if repeats > 1 else f"seed {seed}, no error bars (--repeats 1)")
    preamble = (f"# Evaluation of {run.name}\n\nrun `{run.run_dir.root}`, step {run.step}, {run.weights} weights, "
                f"{n} generated vs {n} held-out examples per row, {repeated}; nfe = model evaluations per sample "
                f"(a guided evaluation runs the conditional and unconditional halves as one batch).")
    if floor_values:
        preamble += "\n\nData-vs-data floor (two independent held-out samples of the same size): " + \
            ", ".join(f"{k} = {v:.5g}" + (f" ± {floor_values[k + '_se']:.2g}" if k + "_se" in floor_values else "")
                      for k, v in floor_values.items() if not k.endswith("_se"))
    if model_values:
        preamble += "\n\nModel metrics (independent of the sampler): " + \
            ", ".join(f"{k} = {v:.5g}" for k, v in model_values.items())
    return preamble


def main(args: argparse.Namespace) -> int:
    import attrs

    import registry
    from core.generate import evaluate, floor
    from core.interfaces import SampleMetric
    from core.runs import load_run, write_table
    from registry import ConfigError

    if args.input1 or args.input2:
        from .eval_inputs import score_inputs

        return score_inputs(args)
    if not args.run_dir:
        raise ConfigError("flowforge eval needs RUN_DIR, or --input1 A --input2 B to score images against others")
    run = load_run(args.run_dir, args.overrides, ema=args.ema, device=args.device, checkpoint=args.checkpoint)
    c = run.components
    if not c.can_generate:
        raise ConfigError(f"{run.run_dir.config}: this experiment has no [solver] and [path]; it cannot generate")
    if args.metric:
        run.components = c = attrs.evolve(c, metrics=_cli_metrics(args.metric, c))
    sample_metrics = {k: m for k, m in c.metrics.items() if isinstance(m, SampleMetric) and not hasattr(m, "evaluate")}
    model_metrics = {k: m for k, m in c.metrics.items() if k not in sample_metrics}
    if not sample_metrics:
        raise ConfigError("this run has no sample metrics to sweep; name some with --metric "
                          f"(installed: {', '.join(registry.available('metric'))})")
    e = run.exp.eval
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    n = args.num_samples or e.num_samples
    seed = run.exp.experiment.seed if args.seed is None else args.seed
    batch_size = args.batch_size or e.batch_size
    guidances = args.guidance or [e.guidance_scale]
    if any(w != 0 for w in guidances) and c.spec.num_classes <= 0:
        print("warning: this data set is unconditional; guidance scales have no effect", file=sys.stderr)
    axes = _sweep_axes(args, run.exp.components["solver"])
    out = Path(args.out) if args.out else run.run_dir.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    print(f"evaluating {run.run_dir.root} (step {run.step}, {run.weights} weights) on {n} samples per point")

    sampled = attrs.evolve(c, metrics=sample_metrics)
    rows = sweep(attrs.evolve(run, components=sampled), axes, args.solver, guidances, n, seed, batch_size,
                 repeats=args.repeats)
    floor_values = mean_and_se([floor(sampled, n, seed + r, batch_size=batch_size) for r in range(args.repeats)]) if args.floor else {}
    model_values = evaluate(attrs.evolve(c, metrics=model_metrics), run.model, n, seed, device=run.device) \
        if model_metrics else {}

    setting_keys = ["solver", *axes, "guidance"]
    metric_keys = [k for k in rows[0] if k not in setting_keys and k not in ("nfe", "seconds") and not k.endswith("_se")]
    columns = [*setting_keys, "nfe", *(c for k in metric_keys for c in (k, f"{k}_se") if c in rows[0]), "seconds"]
    preamble = _preamble(run, n, seed, args.repeats, floor_values, model_values)
    files = write_table(rows, columns, out / "eval", preamble)
    files.append(plot(rows, metric_keys, setting_keys, floor_values, out / "eval.png",
                      f"{run.name} (step {run.step}, {run.weights})"))
    (out / "eval.json").write_text(json.dumps(
        {"run": str(run.run_dir.root), "step": run.step, "weights": run.weights, "num_samples": n, "seed": seed,
         "repeats": args.repeats,
         "rows": rows, "floor": floor_values, "model_metrics": model_values}, indent=2, default=str) + "\n")
    files.append(out / "eval.json")
    print((out / "eval.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
