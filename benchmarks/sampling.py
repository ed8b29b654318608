"""Which ODE solver for a trained flow? Sample quality and wall time against model evaluations.

    python benchmarks/sampling.py                       # trains the 2D checkerboard flow briefly, then measures
    python benchmarks/sampling.py --run runs/rf2d       # a finished run directory instead
    python benchmarks/sampling.py --json                # machine-readable

For one trained 2D model (the EMA weights), every fixed-step method (euler,
midpoint, heun, rk4) on the uniform grid and on EDM's rho = 7 grid draws
``--samples`` points with a budget of 1, 2, 4, 8, 16, 32 and 64 model
evaluations (NFE; a method needs NFE divisible by its stages), and adaptive
dopri5 runs at several tolerances (its NFE is what it used). Each cell reports
the energy distance and sliced Wasserstein distance (metrics registry) to
held-out data, and the wall time of generation (best of ``--repeats``). The
data-vs-data floor of each distance is printed with the tables.

A second table measures the solver loop itself, for the same model and batch:
the time of each fixed-step method over (a) calling the model the same number
of times in a bare Python loop and (b) torchdiffeq's ``odeint`` with the same
method and grid (heun is torchdiffeq's heun2; its rk4 is the 3/8 variant, also
4 evaluations per step), all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

import registry
from core.data import generator as make_generator
from plugins.flow_matching.solver import STAGES, ODEConfig, ODESolver

NFES = (1, 2, 4, 8, 16, 32, 64)
TOLERANCES = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
TORCHDIFFEQ_NAME = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}


def train(steps: int, out: Path) -> Path:
    from core.run import run

    run(ROOT / "experiments" / "rectified_flow_2d.toml",
        [f"trainer.steps={steps}", "trainer.checkpoint_every=0", "trainer.progress=\"off\"", "eval.num_samples=500",
         "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false"], out=out, overwrite=True)
    return out


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def distances(metrics: dict, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    out = {}
    for name, m in metrics.items():
        m.reset()
        m.update(real, real=True)
        m.update(fake, real=False)
        out[name] = float(m.compute())
        m.reset()
    return out


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished run directory of a 2D flow (default: train one briefly)")
    parser.add_argument("--train-steps", type=int, default=1500, help="training steps when no --run is given")
    parser.add_argument("--samples", type=int, default=4000, help="generated and held-out points per cell")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is reported)")
    parser.add_argument("--overhead-batch", type=int, default=256,
                        help="batch of the solver-loop cost table (small batches expose per-step overheads)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--render", metavar="FILE", help="print the tables of a --json output file and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    from core.runs import load_run

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else train(args.train_steps, Path(tmp) / "run")
        loaded = load_run(run_dir, device="cpu")
        comps, model = loaded.components, loaded.model
    model.eval()
    objective, path, spec = comps.objective, comps.path, comps.spec
    field = objective.sampling_model(model)
    n = args.samples
    x0 = path.sample_source((n, *spec.shape), generator=make_generator(0, "bench-noise"))
    real = comps.data.reference(n, make_generator(0, "bench-ref"))["x"]
    floor_ref = comps.data.reference(n, make_generator(0, "bench-floor"))["x"]
    metrics = {"energy_distance": registry.build("metric", {"plugin": "energy_distance"}),
               "sliced_wasserstein": registry.build("metric", {"plugin": "sliced_wasserstein"})}
    floor = distances(metrics, real, floor_ref)

    cells = []
    with torch.no_grad():
        for method, stages in STAGES.items():
            for grid in ("uniform", "edm"):
                for nfe in NFES:
                    if nfe % stages:
                        continue
                    solver = ODESolver(ODEConfig(method=method, steps=nfe // stages, grid=grid), comps.scheduler)
                    out = solver.sample(field, x0)
                    wall = best_time(lambda s=solver: s.sample(field, x0), args.repeats)
                    cells.append({"method": method, "grid": grid, "nfe": out.nfe, "wall_s": wall,
                                  **distances(metrics, real, out.x)})
        for tol in TOLERANCES:
            solver = ODESolver(ODEConfig(method="dopri5", atol=tol, rtol=tol), comps.scheduler)
            out = solver.sample(field, x0)
            wall = best_time(lambda s=solver: s.sample(field, x0), args.repeats)
            cells.append({"method": "dopri5", "grid": f"tol={tol:g}", "nfe": out.nfe, "wall_s": wall,
                          **distances(metrics, real, out.x)})
        overhead = measure_overhead(field, x0[:args.overhead_batch], max(args.repeats, 5))

    figures = {"run": str(run_dir) if args.run else f"(trained {args.train_steps} steps)",
               "checkpoint": loaded.checkpoint.name, "samples": n, "threads": torch.get_num_threads(), "floor": floor,
               "cells": cells, "overhead": overhead}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(render(figures))
    return 0


def render(figures: dict) -> str:
    """The markdown tables of `figures` (what ``--json`` prints)."""
    cells, floor, overhead, n = figures["cells"], figures["floor"], figures["overhead"], figures["samples"]
    out = [f"model: {figures['run']} ({figures['checkpoint']}), {n} samples, {figures['threads']} threads",
           (f"data-vs-data floor: energy distance {floor['energy_distance']:.4g}, "
            f"sliced Wasserstein {floor['sliced_wasserstein']:.4g}\n")]
    rows_by: dict = {}
    for c in cells:
        if c["method"] != "dopri5":
            rows_by.setdefault((c["method"], c["grid"]), {})[c["nfe"]] = c
    for key, title, fmt in (("energy_distance", "energy distance (lower is better)", "{:.4f}"),
                            ("sliced_wasserstein", "sliced Wasserstein distance", "{:.4f}"),
                            ("wall_s", "wall time of generation, ms", "{:.1f}")):
        scale = 1000.0 if key == "wall_s" else 1.0
        rows = [[method, grid] + [fmt.format(byn[m][key] * scale) if m in byn else "-" for m in NFES]
                for (method, grid), byn in rows_by.items()]
        out.append(f"### {title} against model evaluations\n")
        out.append(table(["method", "grid", *[f"NFE {m}" for m in NFES]], rows) + "\n")
    out.append("### dopri5 (adaptive)\n")
    out.append(table(["atol = rtol", "NFE", "energy distance", "sliced W", "wall ms"],
                     [[c["grid"][4:], c["nfe"], f"{c['energy_distance']:.4f}", f"{c['sliced_wasserstein']:.4f}",
                       f"{1000 * c['wall_s']:.1f}"] for c in cells if c["method"] == "dopri5"]) + "\n")
    out.append(f"### solver loop cost (same model, batch {overhead[0]['batch']}, 64 evaluations, best of "
               f"{overhead[0]['repeats']} interleaved runs)\n")
    out.append(table(["method", "solver ms", "bare loop ms", "solver / bare loop", "torchdiffeq ms",
                      "torchdiffeq / solver"],
                     [[o["method"], f"{1000 * o['solver_s']:.1f}", f"{1000 * o['bare_s']:.1f}", f"{o['overhead']:.3f}",
                       f"{1000 * o['torchdiffeq_s']:.1f}", f"{o['speedup_vs_torchdiffeq']:.2f}"] for o in overhead]))
    return "\n".join(out)


def measure_overhead(field, x0: torch.Tensor, repeats: int, nfe: int = 64) -> list[dict]:
    """Fixed-step solver time vs a bare loop of the same number of model calls and vs torchdiffeq."""
    from torchdiffeq import odeint

    batch = x0.shape[0]
    out = []
    for method, stages in STAGES.items():
        steps = nfe // stages
        solver = ODESolver(ODEConfig(method=method, steps=steps))
        grid = solver.time_grid(dtype=x0.dtype)
        t = torch.full((batch,), 0.5)

        def bare(t=t):
            x = x0
            for _ in range(nfe):
                x = field(x, t, None)
            return x

        def ours(solver=solver):
            return solver.sample(field, x0)

        def theirs(grid=grid, name=TORCHDIFFEQ_NAME[method]):
            return odeint(lambda tt, x: field(x, tt.expand(batch), None), x0, grid, method=name)

        bare(), ours(), theirs()  # warm up
        times = {"bare": [], "ours": [], "theirs": []}
        for _ in range(max(repeats, 3)):  # interleaved, so load changes hit all three alike
            for name, fn in (("bare", bare), ("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        b, s, d = min(times["bare"]), min(times["ours"]), min(times["theirs"])
        out.append({"method": method, "nfe": nfe, "batch": batch, "repeats": max(repeats, 3),
                    "solver_s": s, "bare_s": b, "torchdiffeq_s": d,
                    "overhead": s / b, "speedup_vs_torchdiffeq": d / s})
    return out


if __name__ == "__main__":
    sys.exit(main())
