"""One-step and few-step generation: 1-RF, 2-RF, distilled 2-RF, MeanFlow, on the 2D data or the digits.

Trains, through the normal runner, with one network per setup (``--data 2d``: the checkerboard and the
MLP on the positional encoding of x of experiments/rectified_flow_2d.toml, smaller here; ``--data
digits``: the 8x8 digits, unconditional, and the MLP 512 x 4 of experiments/rf_digits.toml):

* **1-RF**: flow matching on independent pairs (rectified_flow_2d.toml / rf_digits.toml);
* **2-RF**: flow matching on ``--pairs`` couplings (x_0, ODE_1RF(x_0)) of the 1-RF (``reflow_pairs``,
  uniform t; reflow_2d_2rf.toml), initialised from the 1-RF's EMA weights (``trainer.init_from``);
* **2-RF distilled, k = 1 / 2**: flow matching on the 2-RF's own couplings with t on {0, ..., (k-1)/k}
  only (``time_sampler = "grid"``; Liu et al.'s one-step / k-step distillation), initialised from the
  2-RF (reflow_2d_distill.toml);
* **MeanFlow**: experiments/meanflow_2d.toml (average velocity, one-step sampler), from scratch.

and prints a markdown table (``--json``: the numbers) of the distance of ``--samples`` generated
examples to held-out data (energy distance on 2D, Frechet distance on the digits' pixels) with 1, 2
and 4 model evaluations: euler steps for the velocity models, MeanFlow jumps ``x += (r - t) u(x, t, r)``
for MeanFlow; ``ref`` is each velocity model under the runner's own solver. ``data floor`` is the same
distance between two independent held-out samples of the same size. Every model trains ``--steps``
optimizer steps, the distilled ones after the 2-RF they distil, which itself follows the 1-RF.

    python benchmarks/one_step.py [--data 2d|digits] [--steps N] [--work runs/one_step_<data>] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import ROOT, emit, table

EXP = ROOT / "experiments"
NFES = (1, 2, 4)

# Per data set: the distance, the experiment files of 1-RF and 2-RF, the overrides of the velocity models
# (sets), of the 2-RF and distilled ones, of MeanFlow (its file is the 2D one), and the default budget.
BACKBONE_2D = ["backbone.hidden=128", "backbone.depth=3", "backbone.input_freqs=4", "backbone.time_dim=32"]
SETUPS = {
    "2d": {"distance": "energy_distance", "one_rf": "rectified_flow_2d.toml", "two_rf": "reflow_2d_2rf.toml",
           "sets": BACKBONE_2D, "two_rf_sets": [], "meanflow_sets": BACKBONE_2D,
           "steps": 1500, "batch": 512, "samples": 2000, "pairs": 10000},
    "digits": {"distance": "frechet_distance", "one_rf": "rf_digits.toml", "two_rf": "rf_digits.toml",
               "sets": ["data.conditional=false", "objective.label_dropout=0.0", "eval.guidance_scale=0.0"],
               "two_rf_sets": ['objective.time_sampler="uniform"'],
               "meanflow_sets": ['data={plugin="digits",form="continuous",conditional=false}', "backbone.hidden=512",
                                 "backbone.depth=4", "backbone.input_freqs=0", "backbone.time_dim=64",
                                 # the objective's defaults, the paper's (meanflow_2d.toml's 2D choice scores
                                 # 1.33 / 1.10 / 1.12 here, time_scale 1000: 4.35 / 3.58 / 3.36)
                                 "objective.ratio=0.25", 'objective.time_sampler="logit_normal"'],
               "steps": 3000, "batch": 256, "samples": 1000, "pairs": 20000},
}


def metrics_override(distance: str, solver: str, samples: int) -> str:
    """The ``metrics`` override: `distance`, and it at 1, 2 and 4 evaluations of `solver`."""
    if solver == "meanflow":
        steps = [f'solver={{plugin="meanflow",steps={k}}}' for k in NFES]
    else:
        steps = [f'method="euler",steps={k}' for k in NFES]
    tables = [f'{{plugin="few_step",name="s{k}",num_samples={samples},distance="{distance}",{s}}}'
              for k, s in zip(NFES, steps)]
    return f'metrics=[{{plugin="{distance}"}},' + ",".join(tables) + "]"


def common(args: argparse.Namespace) -> list[str]:
    return [f"trainer.steps={args.steps}", f"trainer.batch_size={args.batch}", "trainer.checkpoint_every=0",
            'trainer.progress="off"', "trainer.log_every=100", f"eval.num_samples={args.samples}",
            "eval.num_pictures=0", "eval.untrained=false"]


def train(name: str, experiment: str, sets: list[str], args: argparse.Namespace, solver: str = "euler") -> dict:
    from core.run import run

    setup, out = SETUPS[args.data], args.work / name
    dist = setup["distance"]
    start = time.perf_counter()
    summary = run(EXP / experiment, [*common(args), *sets, metrics_override(dist, solver, args.samples)],
                  out=out, overwrite=True)
    wall = time.perf_counter() - start
    m = summary["metrics"]
    return {"model": name, "ref": m[dist] if solver != "meanflow" else None,
            **{f"{k}-step": m[f"s{k}/{dist}"] for k in NFES}, "floor": summary["floor"][dist],
            "train_s": summary["train_wall_time_s"], "wall_s": wall}


def render(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown table of `rows` (what `train` returns)."""
    headers = ["model", "ref (multi-step)", *(f"{k} NFE" for k in NFES), "data floor", "train s"]
    body = [[r["model"], r["ref"] if r["ref"] is not None else "-", *(r[f"{k}-step"] for k in NFES), r["floor"],
             r["train_s"]] for r in rows]
    return (f"{SETUPS[args.data]['distance'].replace('_', ' ')} to held-out {args.data} data ({args.samples} samples; "
            f"lower is better), {args.steps} steps of batch {args.batch} per model\n\n" + table(headers, body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(SETUPS), default="2d")
    for name in ("steps", "batch", "samples", "pairs"):
        parser.add_argument(f"--{name}", type=int, default=None, help="default: the data set's budget")
    parser.add_argument("--work", type=Path, default=None, help="default: runs/one_step_<data>")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup = SETUPS[args.data]
    for name in ("steps", "batch", "samples", "pairs"):
        if getattr(args, name) is None:
            setattr(args, name, setup[name])
    args.work = args.work or ROOT / "runs" / f"one_step_{args.data}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    base = setup["sets"]
    one_rf, two_rf = args.work / "1-RF", args.work / "2-RF"
    reflow = f'{{plugin="reflow_pairs",num_pairs={args.pairs},batch_size=5000,run="RUN"}}'
    rows = [train("1-RF", setup["one_rf"], base, args)]
    rows.append(train("2-RF", setup["two_rf"], [*base, *setup["two_rf_sets"], "data=" + reflow.replace("RUN", str(one_rf)),
                                                f'trainer.init_from="{one_rf}"'], args))
    for k in (1, 2):
        rows.append(train(f"2-RF distilled k={k}", setup["two_rf"],
                          [*base, *setup["two_rf_sets"], "data=" + reflow.replace("RUN", str(two_rf)),
                           f'trainer.init_from="{two_rf}"', 'objective.time_sampler="grid"', f"objective.grid_steps={k}"],
                          args))
    rows.append(train("MeanFlow", "meanflow_2d.toml", setup["meanflow_sets"], args, solver="meanflow"))
    text = render(rows, args)
    emit({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, text, args.json)
    (args.work / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
