"""Fixed-step ODE sampling: flowforge's `ode` solver against a bare loop and against torchdiffeq's odeint.

    python benchmarks/sampling_overhead.py [--batch 4096] [--steps 32] [--json]

For each method, on the same MLP velocity field and the same uniform grid:
- overhead: solver time / time of calling the model the same number of times in a bare loop (goal <= 1.02);
- speed-up: torchdiffeq odeint time / solver time (goal >= 1.25), with the max |difference| of the results
  (goal <= 1e-6; torchdiffeq's "rk4" is the 3/8 rule, so for rk4 the difference is the methods' own).
Times are medians of interleaved repeats in this process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common  # noqa: F401
from _common import emit, table

import torch

TORCHDIFFEQ = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    import registry
    from torchdiffeq import odeint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = registry.build("data", {"plugin": "toy2d"}).spec
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 256, "depth": 4, "time_dim": 32}, spec=spec).eval()
    x0 = torch.randn(args.batch, 2)
    rows, figures = [], {}
    with torch.no_grad():
        for method in ("euler", "midpoint", "heun", "rk4"):
            solver = registry.build("solver", {"plugin": "ode", "method": method, "steps": args.steps})
            nfe = args.steps * STAGES[method]
            t_vec = torch.full((args.batch,), 0.5)

            def bare():
                x = x0
                for _ in range(nfe):
                    x = model(x, t_vec)
                return x

            def ours():
                return solver.sample(model, x0).x

            grid = torch.linspace(0, 1, args.steps + 1)

            def theirs():
                return odeint(lambda t, x: model(x, t.expand(x.shape[0])), x0, grid, method=TORCHDIFFEQ[method])[-1]

            times = {"bare": [], "ours": [], "theirs": []}
            outs = {}
            for _ in range(args.repeats):  # interleaved
                for name, fn in (("bare", bare), ("ours", ours), ("theirs", theirs)):
                    t, outs[name] = timed(fn, 1)
                    times[name].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            diff = (outs["ours"] - outs["theirs"]).abs().max().item()
            figures[method] = {"overhead_vs_bare": med["ours"] / med["bare"], "speedup_vs_torchdiffeq": med["theirs"] / med["ours"],
                               "max_abs_diff": diff, "nfe": nfe, "ms": 1000 * med["ours"]}
            rows.append([method, nfe, 1000 * med["bare"], 1000 * med["ours"], 1000 * med["theirs"],
                         figures[method]["overhead_vs_bare"], figures[method]["speedup_vs_torchdiffeq"], f"{diff:.1e}"])
    text = table(["method", "nfe", "bare loop ms", "flowforge ms", "torchdiffeq ms", "overhead vs bare",
                  "speed-up vs torchdiffeq", "max |diff|"], rows)
    emit(figures, f"sampling overhead (batch {args.batch}, {args.steps} steps, MLP field)\n" + text, args.json)


if __name__ == "__main__":
    main()
