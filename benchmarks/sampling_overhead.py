"""Fixed-step ODE sampling: flowforge's `ode` solver against a bare loop and against torchdiffeq's odeint.

    python benchmarks/sampling_overhead.py [--batch 4096] [--steps 32] [--compile] [--device cuda] [--json]

For each method, on the same MLP velocity field and the same uniform grid:
- overhead: solver time / time of calling the model the same number of times in a bare loop (goal <= 1.02);
- speed-up: torchdiffeq odeint time / solver time (goal >= 1.25), with the max |difference| of the results
  (goal <= 1e-6; torchdiffeq's "rk4" is the 3/8 rule, so for rk4 the difference is the methods' own).
With --compile the table gets a second row per method: the solver with ``compile = true`` (each step one
torch.compile graph: model evaluations and update fused) against a bare loop and torchdiffeq that both call
``torch.compile(model)``, and its speed-up over torchdiffeq calling the eager model.
On CUDA the table also gets rows for ``cuda_graph = true`` (the whole integration captured once as a CUDA
graph and replayed), against the eager (or, with --compile, compiled) bare loop and torchdiffeq.
Times are medians of interleaved repeats in this process (compilation and capture happen in a warm-up call;
CUDA work is synchronised before each clock read).
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
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    import registry
    from torchdiffeq import odeint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="add rows for the compiled sampling loop")
    parser.add_argument("--methods", nargs="*", default=list(TORCHDIFFEQ), choices=list(TORCHDIFFEQ))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    spec = registry.build("data", {"plugin": "toy2d"}).spec
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 256, "depth": 4, "time_dim": 32}, spec=spec)
    model = model.to(dev).eval()
    x0 = torch.randn(args.batch, 2, device=dev)
    rows, figures = [], {}
    with torch.no_grad():
        for method in args.methods:
            solver = registry.build("solver", {"plugin": "ode", "method": method, "steps": args.steps})
            nfe = args.steps * STAGES[method]
            t_vec = torch.full((args.batch,), 0.5, device=dev)
            grid = torch.linspace(0, 1, args.steps + 1, device=dev)

            def bare(net):
                x = x0
                for _ in range(nfe):
                    x = net(x, t_vec)
                return x

            def theirs(net):
                return odeint(lambda t, x: net(x, t.expand(x.shape[0])), x0, grid, method=TORCHDIFFEQ[method])[-1]

            variants = {"bare": lambda: bare(model), "ours": lambda: solver.sample(model, x0).x,
                        "theirs": lambda: theirs(model)}
            if dev.type == "cuda":
                graphed = registry.build("solver", {"plugin": "ode", "method": method, "steps": args.steps,
                                                    "cuda_graph": True})
                variants["ours_g"] = lambda: graphed.sample(model, x0).x
            if args.compile:
                fast = registry.build("solver", {"plugin": "ode", "method": method, "steps": args.steps, "compile": True})
                compiled = torch.compile(model, dynamic=False)
                variants |= {"bare_c": lambda: bare(compiled), "ours_c": lambda: fast.sample(model, x0).x,
                             "theirs_c": lambda: theirs(compiled)}
                if dev.type == "cuda":
                    both = registry.build("solver", {"plugin": "ode", "method": method, "steps": args.steps,
                                                     "compile": True, "cuda_graph": True})
                    variants["ours_cg"] = lambda: both.sample(model, x0).x
            for fn in variants.values():  # compile and capture outside the timed region
                fn()
            times = {name: [] for name in variants}
            outs = {}
            for _ in range(args.repeats):  # interleaved
                for name, fn in variants.items():
                    t, outs[name] = timed(fn, 1)
                    times[name].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            for tag, suffix, ref in (("eager", "", ""), ("compiled", "_c", "_c"), ("cuda graph", "_g", ""),
                                     ("compiled + cuda graph", "_cg", "_c")):
                if "ours" + suffix not in med:
                    continue
                ours, bare_t, theirs_t = med["ours" + suffix], med["bare" + ref], med["theirs" + ref]
                diff = (outs["ours" + suffix] - outs["theirs"]).abs().max().item()
                fig = {"overhead_vs_bare": ours / bare_t, "speedup_vs_torchdiffeq": theirs_t / ours,
                       "speedup_vs_eager_torchdiffeq": med["theirs"] / ours, "max_abs_diff": diff, "nfe": nfe,
                       "ms": 1000 * ours}
                figures[method if tag == "eager" else f"{method}-{tag.replace(' + ', '-').replace(' ', '-')}"] = fig
                rows.append([method, tag, nfe, 1000 * bare_t, 1000 * ours, 1000 * theirs_t, fig["overhead_vs_bare"],
                             fig["speedup_vs_torchdiffeq"], fig["speedup_vs_eager_torchdiffeq"], f"{diff:.1e}"])
    text = table(["method", "model", "nfe", "bare loop ms", "flowforge ms", "torchdiffeq ms", "overhead vs bare",
                  "speed-up vs torchdiffeq", "speed-up vs eager torchdiffeq", "max |diff| to torchdiffeq"], rows)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    emit(figures, f"sampling overhead on {where} (batch {args.batch}, {args.steps} steps, MLP field)\n" + text,
         args.json)


if __name__ == "__main__":
    main()
