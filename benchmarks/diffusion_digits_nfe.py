"""Digits Frechet distance vs NFE of every diffusion solver on one trained DDPM.

    python benchmarks/diffusion_digits_nfe.py                 # trains (or reuses) the run, prints a markdown table
    python benchmarks/diffusion_digits_nfe.py --json
    python benchmarks/diffusion_digits_nfe.py --steps 1000    # a shorter training (say so when quoting numbers)

One model: ``experiments/ddpm_digits.toml`` (class-conditional MLP, 1000-step cosine process,
v-prediction with learned-range variance, improved-DDPM's hybrid loss), trained once into ``--out``
(default ``runs/diffusion_digits_nfe``; a finished run there with the same ``--steps`` is reused). Its
end-of-run evaluation is cut to one cheap 10-step DDIM Frechet distance (``--set`` overrides below); the
benchmark then samples the EMA model with each solver of ``plugins/ddpm`` at NFE 5, 10, 20 and 50:

* ``ddpm_ancestral`` over ``respacing = "N"`` (guided-diffusion's respaced ``p_sample_loop``);
* ``ddim`` over ``respacing = "ddimN"`` (eta 0);
* ``dpm_solver`` 2M, 3M and SDE-2M (DPM-Solver++, ``steps = N``); ``unipc`` (bh2, order 2);
* ``euler`` (EDM, no churn), ``heun`` (``steps = (N + 1) // 2``: 2 steps - 1 evaluations), ``euler_ancestral``;

all with ``clip_denoised = true`` (the data lie in [-1, 1]) on their default grids (linspace for the
sigma-space solvers, guided-diffusion's respacing for ancestral / DDIM). Each cell is the Frechet distance
in the feature space of the project's ``digits_cnn`` network (trained on the training digits, cached) of
``--num`` generated digits (labels uniform, no guidance) to as many held-out digits, mean over ``--seeds``
generation seeds (sd in the JSON). The NFE column heads are the budgets; a solver whose count differs
(Heun: odd counts) shows its own count in parentheses. The floor is the same distance between training and
held-out digits. Every point (with its sd) is also written to ``--out``/nfe.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _common import ROOT, emit, table

from core.commands.eval import sweep  # noqa: E402
from core.config import load  # noqa: E402
from core.run import run_config  # noqa: E402
from core.runs import load_run  # noqa: E402

NFES = (5, 10, 20, 50)
EXPERIMENT = ROOT / "experiments" / "ddpm_digits.toml"

#: (label, plugin, fixed options, NFE budget -> the solver's step options)
SOLVERS = [
    ("DDPM ancestral", "ddpm_ancestral", {}, lambda n: {"respacing": str(n)}),
    ("DDIM (eta 0)", "ddim", {"eta": 0.0}, lambda n: {"respacing": f"ddim{n}"}),
    ("DPM-Solver++ 2M", "dpm_solver", {"order": 2}, lambda n: {"steps": n}),
    ("DPM-Solver++ 3M", "dpm_solver", {"order": 3}, lambda n: {"steps": n}),
    ("SDE-DPM-Solver++ 2M", "dpm_solver", {"order": 2, "sde": True}, lambda n: {"steps": n}),
    ("UniPC bh2", "unipc", {"solver_type": "bh2"}, lambda n: {"steps": n}),
    ("EDM Euler", "euler", {}, lambda n: {"steps": n}),
    ("EDM Heun", "heun", {}, lambda n: {"steps": (n + 1) // 2}),
    ("Euler ancestral", "euler_ancestral", {}, lambda n: {"steps": n}),
]


def overrides(steps: int, num: int) -> list[str]:
    """``--set`` values: the training length, and a cheap end-of-run evaluation (FD of 10-step DDIM)."""
    return [f"trainer.steps={steps}", "trainer.progress=lines", "solver.plugin=ddim", "solver.respacing=ddim10",
            f"eval.num_samples={num}", "eval.untrained=false", "eval.floor=false",
            'metrics=[{plugin = "frechet_distance"}]']


def trained_run(out: Path, steps: int, num: int) -> tuple[object, float | None, bool]:
    """(the loaded run, its training seconds, whether it was reused) of ddpm_digits trained for `steps`."""
    summary = out / "summary.json"
    reused = summary.is_file() and json.loads(summary.read_text()).get("steps") == steps
    if not reused:
        print(f"== training {EXPERIMENT.name} for {steps} steps -> {out}", flush=True)
        run_config(load(EXPERIMENT, overrides(steps, num)), out, overwrite=True)
    info = json.loads(summary.read_text())
    return load_run(out, device="cpu"), info.get("train_wall_time_s"), reused


def point(run, plugin: str, options: dict, num: int, seeds: int) -> dict:
    """FD (mean, sd over seeds) and NFE of one solver setting."""
    axes = {k: [v] for k, v in {"clip_denoised": True, **options}.items()}
    fds, nfe = [], None
    for seed in range(seeds):
        (row,) = sweep(run, axes, [plugin], [0.0], num, seed, 500, log=lambda *_: None)
        fds.append(float(row["frechet_distance"]))
        nfe = row["nfe"]
    return {"fd": statistics.fmean(fds), "sd": statistics.stdev(fds) if seeds > 1 else 0.0, "nfe": nfe}


def data_floor(num: int, seeds: int) -> float:
    """FD of `num` training digits to `num` held-out digits, mean over seeds (`digits_comparison.floor`)."""
    from digits_comparison import floor

    digits = {"plugin": "digits", "form": "continuous", "conditional": True}
    return floor(num, seeds, digits, [{"plugin": "frechet_distance"}])["frechet_distance"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000, help="training steps (the experiment's 4000)")
    parser.add_argument("--num", type=int, default=360, help="generated digits per point (held-out: 360)")
    parser.add_argument("--seeds", type=int, default=2, help="generation seeds per point")
    parser.add_argument("--out", default=str(ROOT / "runs" / "diffusion_digits_nfe"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run, train_s, reused = trained_run(Path(args.out), args.steps, args.num)
    figures: dict = {"train_steps": args.steps, "train_seconds": train_s, "reused": reused, "points": {}}
    rows = []
    for label, plugin, fixed, budget in SOLVERS:
        cells = [label]
        for nfe in NFES:
            p = point(run, plugin, {**fixed, **budget(nfe)}, args.num, args.seeds)
            figures["points"][f"{label}/{nfe}"] = p
            cells.append(f"{p['fd']:.3g}" + ("" if p["nfe"] == nfe else f" ({p['nfe']})"))
            print(f"  {label} nfe={p['nfe']} fd={p['fd']:.4g}±{p['sd']:.2g}", flush=True)
        rows.append(cells)
    figures["floor"] = data_floor(args.num, args.seeds)
    rows.append(["floor: training vs held-out digits", *[f"{figures['floor']:.3g}"] * len(NFES)])
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    text = table(["solver", *[f"NFE {n}" for n in NFES]], rows)
    text += (f"\n\n{args.steps} training steps ({'reused run' if reused else f'{train_s} s training'}); "
             f"{args.num} digits x {args.seeds} seeds per cell; {figures['seconds']} s in all.")
    (Path(args.out) / "nfe.json").write_text(json.dumps(figures, indent=1))  # every point, kept with the run
    emit(figures, text, args.json)


if __name__ == "__main__":
    main()
