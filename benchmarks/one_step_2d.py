"""One-step and few-step generation on the 2D checkerboard: 1-RF, 2-RF, distilled 2-RF, MeanFlow.

Trains, through the normal runner and on the data and network of experiments/rectified_flow_2d.toml
(an MLP on the positional encoding of x; smaller width and budget here):

* **1-RF**: flow matching (experiments/rectified_flow_2d.toml);
* **2-RF**: flow matching on the 1-RF's couplings (x_0, ODE_1RF(x_0)) (experiments/reflow_2d_2rf.toml);
* **2-RF distilled, k = 1 / 2**: flow matching on the 2-RF's own couplings with t on {0, ..., (k-1)/k}
  only (``time_sampler = "grid"``; Liu et al.'s one-step / k-step distillation), trained from scratch;
* **MeanFlow**: experiments/meanflow_2d.toml (average velocity, one-step sampler), from scratch.

and prints a markdown table (``--json``: the numbers) of the energy distance of ``--samples`` generated
points to held-out data with 1, 2 and 4 model evaluations: euler steps for the velocity models,
MeanFlow jumps ``x += (r - t) u(x, t, r)`` for MeanFlow; ``ref`` is each velocity model under the
runner's own solver (the 1-RF's 20 midpoint steps, the others' 25 rk4 steps). ``data floor`` is the
same distance between two independent held-out samples of the same size (seeded by each run's seed). Every model trains ``--steps`` optimizer steps (the distilled
ones after the 2-RF they distil, which itself follows the 1-RF).

    python benchmarks/one_step_2d.py [--steps 1500] [--work runs/one_step_2d] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import ROOT, emit, table

EXP = ROOT / "experiments"
STEPS = (1, 2, 4)


def few_step(solver: str) -> str:
    """The ``metrics`` override: the energy distance, and it at 1, 2 and 4 evaluations of `solver`."""
    if solver == "meanflow":
        tables = [f'{{plugin="few_step",name="s{k}",num_samples=NUM,solver={{plugin="meanflow",steps={k}}}}}'
                  for k in STEPS]
    else:
        tables = [f'{{plugin="few_step",name="s{k}",num_samples=NUM,method="euler",steps={k}}}' for k in STEPS]
    return "metrics=[{plugin=\"energy_distance\"}," + ",".join(tables) + "]"


def common(args: argparse.Namespace) -> list[str]:
    return [f"trainer.steps={args.steps}", f"trainer.batch_size={args.batch}", "trainer.checkpoint_every=0",
            'trainer.progress="off"', "trainer.log_every=100", f"eval.num_samples={args.samples}",
            "eval.num_pictures=0", "eval.untrained=false", f"backbone.hidden={args.hidden}",
            f"backbone.depth={args.depth}", "backbone.input_freqs=4", "backbone.time_dim=32"]


def train(name: str, experiment: str, sets: list[str], args: argparse.Namespace, solver: str = "euler") -> dict:
    from core.run import run

    out = args.work / name
    metrics = few_step(solver).replace("NUM", str(args.samples))
    start = time.perf_counter()
    summary = run(EXP / experiment, [*common(args), *sets, metrics], out=out, overwrite=True)
    wall = time.perf_counter() - start
    m = summary["metrics"]
    return {"model": name, "ref": m["energy_distance"] if solver != "meanflow" else None,
            **{f"{k}-step": m[f"s{k}/energy_distance"] for k in STEPS}, "floor": summary["floor"]["energy_distance"],
            "train_s": summary["train_wall_time_s"], "wall_s": wall}


def render(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown table of `rows` (what `train` returns)."""
    headers = ["model", "ref (multi-step)", *(f"{k} NFE" for k in STEPS), "data floor", "train s"]
    body = [[r["model"], r["ref"] if r["ref"] is not None else "-", *(r[f"{k}-step"] for k in STEPS), r["floor"],
             r["train_s"]] for r in rows]
    return (f"energy distance to held-out checkerboard data ({args.samples} samples; lower is better), "
            f"{args.steps} steps of batch {args.batch} per model, MLP {args.hidden}x{args.depth}\n\n"
            + table(headers, body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "one_step_2d")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    reflow = [f"data.num_pairs={args.pairs}", "data.batch_size=5000"]
    rows = [train("1-RF", "rectified_flow_2d.toml", [], args)]
    rows.append(train("2-RF", "reflow_2d_2rf.toml", [*reflow, f'data.run="{args.work / "1-RF"}"'], args))
    for k in (1, 2):
        rows.append(train(f"2-RF distilled k={k}", "reflow_2d_2rf.toml",
                          [*reflow, f'data.run="{args.work / "2-RF"}"', 'objective.time_sampler="grid"',
                           f"objective.grid_steps={k}"], args))
    rows.append(train("MeanFlow", "meanflow_2d.toml", [], args, solver="meanflow"))
    text = render(rows, args)
    emit({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, text, args.json)
    (args.work / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
