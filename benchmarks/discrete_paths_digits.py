"""Discrete paths on the 8x8 digits: the masked and uniform mixture paths against the metric-induced path.

Trains, through the normal runner, the class-conditional recipe of experiments/discrete_flow_digits.toml
(MLP 256 x 4, generalized KL, 1000 steps of 256, guidance 1, 64 discrete Euler steps) on three paths:

* **mixture, mask source** (experiments/discrete_flow_digits.toml: kappa_t = t, the sym divergence-free term);
* **mixture, uniform source** (the same, without the mask token and with uniform source tokens);
* **metric-induced, absolute distance** (experiments/discrete_flow_digits_metric.toml: p_t ~ exp(-beta_t |x - x_1|),
  beta_t = c t / (1 - t), its kinetic-optimal velocity; ``--beta-scales`` lists the c tried), and the
  same path with ``add_likelihood = false`` (the network alone predicts the posterior).

and prints a markdown table (``--json``: the numbers) of the energy distance of 360 samples to held-out
images (grey levels; the data floor alongside) and the held-out ELBO bound in bits per pixel on each
model's own path (both bound -log2 p(image | label), so they compare across paths), as mean ± sd over
``--seeds``.

    python benchmarks/discrete_paths_digits.py [--seeds 0 1] [--work runs/discrete_paths_digits] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _common import ROOT, emit, table

EXP = ROOT / "experiments"
MIXTURE = "discrete_flow_digits.toml"
METRIC = "discrete_flow_digits_metric.toml"


def recipes(beta_scales: list[float]) -> list[tuple[str, str, list[str]]]:
    """(name, experiment, overrides) of every model of the table."""
    uniform = ['data={plugin="digits",form="discrete"}', 'path.source="uniform"', "solver.div_free=0",
               'metrics=[{plugin="energy_distance"},{plugin="discrete_elbo",path={plugin="mixture_discrete",'
               'source="uniform"},scheduler={plugin="cond_ot"},num_examples=360,times=8}]']
    rows = [("mixture, mask source", MIXTURE, []), ("mixture, uniform source", MIXTURE, uniform)]
    for c, add in [*((c, True) for c in beta_scales), (beta_scales[0], False)]:
        path = f'{{plugin="metric_discrete",metric="absolute",beta_scale={c},add_likelihood={str(add).lower()}}}'
        name = f"metric-induced, absolute distance, c = {c:g}" + ("" if add else ", no added likelihood")
        rows.append((name, METRIC, [f"path={path}", 'metrics=[{plugin="energy_distance"},{plugin="discrete_elbo",'
                                    f'path={path},num_examples=360,times=8}}]']))
    return rows


def train(name: str, experiment: str, sets: list[str], seed: int, work: Path) -> dict:
    from core.run import run

    out = work / f"{name.replace(' ', '_').replace('|', '').replace(',', '')}-seed{seed}"
    start = time.perf_counter()
    summary = run(EXP / experiment, [*sets, f"experiment.seed={seed}", 'trainer.progress="off"',
                                     "eval.untrained=false"], out=out, overwrite=True)
    m = summary["metrics"]
    return {"model": name, "seed": seed, "energy_distance": m["energy_distance"],
            "bits_per_pixel": m["discrete_elbo/bits_per_token"], "floor": summary["floor"]["energy_distance"],
            "train_s": summary["train_wall_time_s"], "wall_s": time.perf_counter() - start}


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def render(rows: list[dict], seeds: list[int]) -> str:
    """The markdown table of `rows` (what `train` returns), one line per model."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    body = []
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        body.append([name, mean_sd([r["energy_distance"] for r in mine]), mean_sd([r["bits_per_pixel"] for r in mine]),
                     mean_sd([r["floor"] for r in mine]), f"{statistics.mean(r['train_s'] for r in mine):.0f}"])
    return (f"digits, 1000 steps of 256 per model, seeds {', '.join(map(str, seeds))}: energy distance of 360 "
            "samples to held-out images (lower is better) and the held-out ELBO bound (bits per pixel; uniform "
            "grey levels are 4.09)\n\n"
            + table(["path", "energy distance", "bits per pixel (bound)", "data floor", "train s"], body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--beta-scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "discrete_paths_digits")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    rows = [train(name, exp, sets, seed, args.work) for name, exp, sets in recipes(args.beta_scales)
            for seed in args.seeds]
    emit({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, render(rows, args.seeds), args.json)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
