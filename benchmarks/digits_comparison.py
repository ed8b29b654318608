"""Rectified flow vs DDPM vs discrete flow matching on the 8x8 digits, at equal training steps.

    python benchmarks/digits_comparison.py                  # full: under an hour on one CPU core
    python benchmarks/digits_comparison.py --quick          # a smoke test of the whole pipeline (minutes)

Each model is the same class-conditional MLP backbone (256 wide, 3 hidden
layers, 10% label dropout) trained for the same number of steps with the same
optimiser, batch and EMA, on the same 1437 training digits:

* rectified flow: continuous digits in [-1, 1], straight path, velocity MSE with
  logit-normal times; sampled with the midpoint ODE solver;
* DDPM: improved-DDPM's recipe (cosine schedule over 1000 steps, epsilon
  prediction with learned variances, hybrid loss); sampled with DDIM (eta 0)
  over respaced steps and with 1000-step ancestral sampling;
* discrete flow matching: the 17 grey levels as tokens, a mask source, the
  polynomial scheduler kappa_t = t^2, generalized-KL loss; sampled with the
  discrete Euler (CTMC) sampler.

Every model is scored at several numbers of model evaluations (NFE) by the same
metrics against the 360 held-out digits: the feature Frechet distance, KID and
precision/recall in the feature space of one small classifier flowforge trains
on the training digits and caches (the discrete form of the digits is the same
data, so it uses the same network; see plugins/metrics/features.py). Each point
is the mean (and standard deviation) over three generation seeds of 360
generated digits. The floor is the same metric between 360 *training* digits
and the held-out digits: what a model that reproduced the training data would
score (two held-out samples of 360 would be the same set).

A family whose plugins are not installed (registry.available) is skipped and
listed as such; re-run the script when it lands. Writes, under ``--docs``
(default docs/results): digits_comparison.md / .csv (every point),
digits_summary.md (one row per model at its best NFE and at NFE ~ 32),
digits_fd_vs_nfe.png, and sample grids digits_<model>.png (rows sorted by class)
next to digits_heldout.png; the runs themselves go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attrs  # noqa: E402
import torch  # noqa: E402

import registry  # noqa: E402
from core.collectives import Group  # noqa: E402
from core.commands.eval import sweep  # noqa: E402
from core.config import resolve  # noqa: E402
from core.data import generator as make_generator  # noqa: E402
from core.generate import _compute_sample_metrics, generate  # noqa: E402
from core.run import run_config  # noqa: E402
from core.runs import build_solver, load_run, pyplot, write_table  # noqa: E402

METRICS = [{"plugin": "frechet_distance"}, {"plugin": "kid"}, {"plugin": "precision_recall"}]
NAMES = ["frechet_distance", "kid", "precision_recall"]


def common(steps: int) -> dict[str, Any]:
    return {
        "backbone": {"plugin": "mlp", "hidden": 256, "depth": 3, "time_dim": 64},
        "trainer": {"steps": steps, "batch_size": 128, "lr": 1e-3, "warmup_steps": min(200, steps // 10),
                    "lr_schedule": "cosine", "ema_decay": 0.999, "log_every": max(1, steps // 40),
                    "progress": "lines"},
        "eval": {"num_samples": 360, "num_pictures": 100, "batch_size": 500, "untrained": False, "floor": False},
        "metrics": [dict(m) for m in METRICS],
    }


def experiments(steps: int) -> dict[str, dict[str, Any]]:
    """name -> (raw config, required components, NFE sweep as (solver mapping, nfe-ish label) list)."""
    digits = {"plugin": "digits", "form": "continuous", "conditional": True}
    out = {}
    out["rectified_flow"] = {
        "config": {**common(steps), "experiment": {"name": "digits-rectified-flow", "seed": 0}, "data": digits,
                   "scheduler": {"plugin": "cond_ot"}, "path": {"plugin": "affine"},
                   "objective": {"plugin": "velocity_mse", "time_sampler": "logit_normal", "label_dropout": 0.1},
                   "solver": {"plugin": "ode", "method": "midpoint", "steps": 16}},
        "needs": [("scheduler", "cond_ot"), ("path", "affine"), ("objective", "velocity_mse"), ("solver", "ode")],
        "sweeps": [("ode", {"method": ["midpoint"], "steps": [2, 4, 8, 16, 32]})],
    }
    out["ddpm"] = {
        "config": {**common(steps), "experiment": {"name": "digits-ddpm", "seed": 0}, "data": digits,
                   "backbone": {**common(steps)["backbone"], "out_channels_mult": 2},
                   "path": {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": 1000,
                            "prediction": "epsilon", "variance": "learned_range"},
                   "objective": {"plugin": "ddpm", "loss_type": "rescaled_mse", "label_dropout": 0.1},
                   "solver": {"plugin": "ddim", "respacing": "32"}},
        "needs": [("path", "gaussian_diffusion"), ("objective", "ddpm"), ("solver", "ddim"),
                  ("solver", "ddpm_ancestral")],
        "sweeps": [("ddim", {"respacing": ["4", "8", "16", "32", "64"]}),
                   ("ddpm_ancestral", {"respacing": ["1000"]})],
    }
    out["discrete_flow"] = {
        "config": {**common(steps), "experiment": {"name": "digits-discrete-flow", "seed": 0},
                   "data": {"plugin": "with_mask_token", "data": {**digits, "form": "discrete"}},
                   "backbone": {**common(steps)["backbone"], "token_dim": 16},
                   "scheduler": {"plugin": "polynomial", "n": 2.0}, "path": {"plugin": "mixture_discrete", "source": "mask"},
                   "objective": {"plugin": "discrete_fm", "loss": "generalized_kl", "label_dropout": 0.1},
                   "solver": {"plugin": "discrete_euler", "steps": 32}},
        "needs": [("data", "with_mask_token"), ("scheduler", "polynomial"), ("path", "mixture_discrete"),
                  ("objective", "discrete_fm"), ("solver", "discrete_euler")],
        "sweeps": [("discrete_euler", {"steps": [4, 8, 16, 32, 64]})],
    }
    return out


def missing(needs: list[tuple[str, str]]) -> list[str]:
    return [f"{kind}:{name}" for kind, name in needs if name not in registry.available(kind)]


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluate_run(name: str, out: Path, spec: dict[str, Any], n: int, seeds: int) -> list[dict[str, Any]]:
    """Every sweep point of one trained run, averaged over generation seeds."""
    run = load_run(out, device="cpu")
    rows = []
    for solver, axes in spec["sweeps"]:
        try:
            per_seed = [sweep(run, axes, [solver], [0.0], n, seed, 500, log=lambda *_: None) for seed in range(seeds)]
        except Exception as exc:  # noqa: BLE001 - one sampler failing must not hide the others
            print(f"  {name} {solver}: failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        for points in zip(*per_seed):
            first = points[0]
            row = {"model": name, "sampler": solver, **{k: first[k] for k in axes}, "nfe": first["nfe"],
                   "seconds": round(sum(p["seconds"] for p in points) / len(points), 2)}
            for key in first:
                if key.split("/")[0] in NAMES:
                    row[key], row[key + " sd"] = mean_std([float(p[key]) for p in points])
            print(f"  {name} {solver} {dict((k, first[k]) for k in axes)} nfe={first['nfe']} "
                  f"fd={row['frechet_distance']:.3f}±{row['frechet_distance sd']:.3f}", flush=True)
            rows.append(row)
    return rows


def floor(n: int, seeds: int, data_cfg: dict[str, Any], metrics: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The metrics (default `METRICS`) between `n` training digits and the held-out digits (mean over seeds)."""
    data = registry.build("data", data_cfg)
    metrics = {m["plugin"]: registry.build("metric", m, spec=data.spec, data=data) for m in metrics or METRICS}
    values: dict[str, list[float]] = {}
    for seed in range(seeds):
        train = next(data.train_batches(n, seed=1000 + seed))["x"]
        held = data.reference(n, make_generator(seed, "eval-reference", 0))["x"]
        for k, v in _compute_sample_metrics(metrics, held, train, Group(0, 1)).items():
            values.setdefault(k, []).append(v)
    row: dict[str, Any] = {"model": "floor: training digits", "sampler": "(data)", "nfe": None}
    for k, vs in values.items():
        row[k], row[k + " sd"] = mean_std(vs)
    return row


def plot(rows: list[dict[str, Any]], floor_row: dict[str, Any], path: Path, subtitle: str) -> None:
    plt = pyplot()
    panels = [("frechet_distance", "feature Frechet distance (lower is better)"),
              ("precision_recall/precision", "precision (higher is better)"),
              ("precision_recall/recall", "recall (higher is better)")]
    fig, axs = plt.subplots(1, 3, figsize=(14, 3.9), dpi=100)
    for ax, (key, title) in zip(axs, panels):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(f"{r['model']} ({r['sampler']})", []).append(r)
        for label, items in groups.items():
            items = sorted(items, key=lambda r: r["nfe"])
            ax.errorbar([r["nfe"] for r in items], [r[key] for r in items], yerr=[r[key + " sd"] for r in items],
                        marker="o", capsize=3, label=label)
        if key in floor_row:
            ax.axhline(floor_row[key], ls="--", color="grey", label="training digits vs held-out")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model evaluations per sample (NFE)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axs[0].set_yscale("log")
    axs[0].legend(fontsize=7)
    fig.suptitle(subtitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="training steps of every model (default 5000)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--num", type=int, default=360, help="generated digits per evaluation (default 360)")
    parser.add_argument("--seeds", type=int, default=3, help="generation seeds per point (default 3)")
    parser.add_argument("--out", default="runs/digits_comparison", help="run directories")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "results"), help="tables, plot and grids")
    parser.add_argument("--only", help="comma-separated models to run (rectified_flow, ddpm, discrete_flow)")
    parser.add_argument("--reuse", action="store_true", help="evaluate existing runs in --out instead of training")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 60 steps, 100 digits, one seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:  # also a quickly trained feature network (cached apart from the real one)
        args.steps, args.num, args.seeds = 60, 100, 1
        for m in METRICS:
            m["train_steps"] = 50
    out, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    exps = experiments(args.steps)
    chosen = args.only.split(",") if args.only else list(exps)
    rows, status, train_time = [], {}, {}
    for name in chosen:
        spec = exps[name]
        lacking = missing(spec["needs"])
        if lacking:
            status[name] = f"skipped: not installed ({', '.join(lacking)})"
            print(f"{name}: {status[name]}", flush=True)
            continue
        run_dir = out / name
        try:
            if not args.reuse:
                print(f"== training {name} for {args.steps} steps -> {run_dir}", flush=True)
                t0 = time.perf_counter()
                summary = run_config(resolve(spec["config"]), run_dir, overwrite=True)
                train_time[name] = summary.get("train_wall_time_s", round(time.perf_counter() - t0, 1))
            else:
                train_time[name] = json.loads((run_dir / "summary.json").read_text()).get("train_wall_time_s")
            print(f"== evaluating {name}", flush=True)
            rows += evaluate_run(name, run_dir, spec, args.num, args.seeds)
            status[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - a failing family must not hide the others' results
            status[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"{name}: {status[name]}", flush=True)
    floor_row = floor(args.num, args.seeds, {"plugin": "digits", "form": "continuous", "conditional": True})
    rows_all = [*rows, floor_row]

    # -- tables
    metric_cols = ["frechet_distance", "frechet_distance sd", "kid", "kid sd", "precision_recall/precision",
                   "precision_recall/recall"]
    setting_cols = ["model", "sampler", "steps", "method", "respacing", "nfe"]
    setting_cols = [c for c in setting_cols if any(r.get(c) is not None for r in rows_all)]
    header = (f"# Digits: every evaluated point\n\n{args.steps} training steps per model; {args.num} generated vs "
              f"{args.num} held-out digits per point; mean and sd over {args.seeds} generation seed(s); "
              f"seconds: sampling and scoring one seed.")
    write_table(rows_all, [*setting_cols, *metric_cols, "seconds"], docs / "digits_comparison", header)
    summary_rows = []
    for name in chosen:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            summary_rows.append({"model": name, "status": status.get(name, "")})
            continue
        best = min(mine, key=lambda r: r["frechet_distance"])
        near32 = min(mine, key=lambda r: (abs(math.log2(r["nfe"]) - 5), r["nfe"]))
        for which, r in (("best", best), ("NFE~32", near32)):
            summary_rows.append({"model": name, "point": which, "sampler": r["sampler"], "nfe": r["nfe"],
                                 **{k: r[k] for k in metric_cols}, "train s": train_time.get(name),
                                 "status": status[name]})
    summary_rows.append({"model": "floor: training digits", **{k: floor_row[k] for k in metric_cols}})
    write_table(summary_rows, ["model", "point", "sampler", "nfe", *metric_cols, "train s", "status"],
                docs / "digits_summary", f"# Digits: summary ({args.steps} training steps per model)")

    # -- plot and grids
    if rows:
        plot(rows, floor_row, docs / "digits_fd_vs_nfe.png",
             f"8x8 digits, {args.steps} training steps each, {args.num} samples x {args.seeds} seed(s) vs held-out")
    for name in chosen:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["frechet_distance"])
        run = load_run(out / name, device="cpu")
        axes = {k: best[k] for k in ("steps", "method", "respacing") if best.get(k) is not None}
        base = run.exp.components["solver"]
        mapping = {**(base if base["plugin"] == best["sampler"] else {"plugin": best["sampler"]}), **axes}
        comps = attrs.evolve(run.components, solver=build_solver(run, mapping))
        labels = torch.arange(10).repeat_interleave(10)
        batch, _ = generate(comps, run.model, 100, make_generator(0, "grid"), labels=labels, device=run.device)
        run.components.data.render(batch, str(docs / f"digits_{name}"))
    data = registry.build("data", {"plugin": "digits"})
    held = data.reference(100, make_generator(0, "grid"))
    data.render(held, str(docs / "digits_heldout"))
    print((docs / "digits_summary.md").read_text())
    print(json.dumps(status, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
