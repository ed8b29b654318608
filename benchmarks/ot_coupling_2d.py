"""Independent vs minibatch-OT coupling on the 2D checkerboard: sample quality against the number of steps.

Trains experiments/rectified_flow_2d.toml twice with the same budget (steps, batch, model, seed) through the
normal runner (``python -m core.run`` in a subprocess, one thread): ``objective.coupling = "independent"`` and
``"ot"`` (exact OT on blocks of ``--block`` examples). Each run's summary reports the energy distance of
generated points to held-out data under euler with 1, 2, 4, 8 and 16 steps (``few_step`` metrics, NFE = steps)
and under the experiment's own 20-step midpoint solver (NFE 40). Writes a markdown table to
docs/results/ot_coupling_2d.md and the plot docs/results/ot_coupling_2d.png.

    OMP_NUM_THREADS=1 python benchmarks/ot_coupling_2d.py [--steps 2000] [--block 256] [--seed 0] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "rectified_flow_2d.toml"
NFES = (1, 2, 4, 8, 16)
SAMPLES = 2000


def metrics_override() -> str:
    few = ",".join(f'{{plugin="few_step",steps={k},name="euler{k}",num_samples={SAMPLES}}}' for k in NFES)
    return f'metrics=[{few},{{plugin="energy_distance"}}]'


def train(coupling: str, args: argparse.Namespace) -> dict:
    out = args.work / f"{coupling}-seed{args.seed}"
    if not (args.reuse and (out / "summary.json").exists()):
        sets = [f'objective.coupling="{coupling}"', f"objective.coupling_block={args.block}",
                f"trainer.steps={args.steps}", f"experiment.seed={args.seed}", metrics_override(),
                "trainer.checkpoint_every=0", 'trainer.progress="off"', f"eval.num_samples={SAMPLES}"]
        cmd = [sys.executable, "-m", "core.run", str(EXPERIMENT), "--out", str(out), "--overwrite"]
        for s in sets:
            cmd += ["--set", s]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        print(f"{coupling}: {time.time() - start:.0f} s", file=sys.stderr)
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    row = {f"euler {k}": m[f"euler{k}/energy_distance"] for k in NFES}
    row["midpoint 20 (NFE 40)"] = m["energy_distance"]
    floor = (summary.get("floor") or {}).get("energy_distance")
    return {"coupling": coupling, "energy": row, "wall": summary.get("train_wall_time_s"), "floor": floor,
            "loss": summary.get("final_loss")}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r, color in zip(results, ("C0", "C1")):
        ax.plot(NFES, [r["energy"][f"euler {k}"] for k in NFES], marker="o", color=color,
                label=f"{r['coupling']} (euler; x: midpoint 20)")
        ax.scatter([40], [r["energy"]["midpoint 20 (NFE 40)"]], marker="x", color=color)
    if results[0]["floor"] is not None:
        ax.axhline(results[0]["floor"], color="gray", linestyle="--", label="data-vs-data floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("energy distance to held-out data")
    ax.set_title("checkerboard: independent vs OT coupling")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ot_coupling_2d")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args(argv)
    results = [train(c, args) for c in ("independent", "ot")]
    cols = [f"euler {k}" for k in NFES] + ["midpoint 20 (NFE 40)"]
    lines = ["# Independent vs OT coupling on the checkerboard: energy distance vs NFE", "",
             f"Written by `python benchmarks/ot_coupling_2d.py --steps {args.steps} --block {args.block} "
             f"--seed {args.seed}`: experiments/rectified_flow_2d.toml trained {args.steps} steps per coupling "
             f"(same model, batch, lr, seed), OT on blocks of {args.block}. Energy distance of {SAMPLES} EMA-model "
             "samples to held-out data (lower is better); floor: two independent held-out samples of the same size. "
             "One seed. Train s: wall time on a shared, loaded machine (not a speed comparison).", "",
             "| coupling | " + " | ".join(cols) + " | floor | final loss | train s |",
             "|---|" + "---|" * (len(cols) + 3)]
    for r in results:
        cells = [f"{r['energy'][c]:.4f}" for c in cols]
        cells += [f"{r['floor']:.4f}" if r["floor"] is not None else "-",
                  f"{r['loss']:.4f}" if r["loss"] is not None else "-",
                  f"{r['wall']:.0f}" if r["wall"] is not None else "-"]
        lines.append(f"| {r['coupling']} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (args.out / "ot_coupling_2d.md").write_text(text)
    print(text)
    try:
        plot(results, args.out / "ot_coupling_2d.png")
    except ImportError as exc:
        print(f"no plot: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
