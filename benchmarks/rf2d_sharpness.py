"""Old vs new experiments/rectified_flow_2d.toml: how square are the checkerboard's cells?

Trains the experiment file twice per seed through the normal runner (``python -m core.run`` in a
subprocess, one thread): as committed ("new"), and with the overrides that restore the previous
settings ("old", issue 25: round blobs). Writes a markdown table of ``off_support`` (fraction of
samples outside the 8 cells; data floor 0) and the energy distance, mean +- standard error over
seeds, and the training wall time, to docs/results/rf2d_sharpness.md, and puts the two seed-0
pictures side by side in docs/results/rf2d_old_vs_new.png.

    python benchmarks/rf2d_sharpness.py [--seeds 3] [--jobs 1] [--work runs/rf2d_sharpness] [--set k=v ...] [--reuse]

``--set`` overrides are applied to both configs (e.g. ``--set trainer.steps=500`` for a quick look).
``--jobs 2`` trains two runs at once (faster, but the wall times then include the contention).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "rectified_flow_2d.toml"

#: The settings before issue 25, as overrides of the committed file.
OLD = ["trainer.lr=2e-3", "objective.mean=0.0", "backbone.input_freqs=0", 'backbone.activation="silu"']
CONFIGS = {"old (before issue 25)": OLD, "new (committed)": []}
METRICS = 'metrics=[{plugin="off_support"},{plugin="energy_distance"}]'


def train(label: str, overrides: list[str], seed: int, work: Path, extra: list[str], reuse: bool = False) -> dict:
    out = work / f"{'old' if label.startswith('old') else 'new'}-seed{seed}"
    if reuse and (out / "summary.json").exists():
        return _result(label, seed, out)
    sets = [*overrides, f"experiment.seed={seed}", METRICS, "trainer.checkpoint_every=0",
            'trainer.progress="off"', *extra]
    cmd = [sys.executable, "-m", "core.run", str(EXPERIMENT), "--out", str(out), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return _result(label, seed, out)


def _result(label: str, seed: int, out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    return {"label": label, "seed": seed, "off": m["off_support/fraction"], "energy": m["energy_distance"],
            "wall": summary["train_wall_time_s"], "png": out / "samples" / "final.png"}


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return mu, float("nan")
    var = sum((x - mu) ** 2 for x in xs) / (n - 1)
    return mu, math.sqrt(var / n)


def side_by_side(old_png: Path, new_png: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    for ax, png, title in zip(axes, (old_png, new_png), ("old (before issue 25)", "new (committed)")):
        ax.imshow(mpimg.imread(png))
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "rf2d_sharpness")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reuse", action="store_true",
                        help="take a run whose summary.json already exists in --work instead of training it again")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args(argv)

    jobs = [(label, ov, seed) for seed in range(args.seeds) for label, ov in CONFIGS.items()]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda j: train(*j, args.work, args.overrides, args.reuse), jobs))

    lines = [
        "# Rectified flow on the checkerboard: old vs new `rectified_flow_2d.toml`",
        "",
        f"Written by `python benchmarks/rf2d_sharpness.py --seeds {args.seeds} --jobs {args.jobs}"
        + "".join(f" --set {s}" for s in args.overrides) + "`.",
        f"{args.seeds} seeds per config (`experiment.seed`), 4000 generated samples each; mean +- standard",
        "error over seeds. `off_support`: fraction of samples outside the 8 cells (data floor 0).",
        "Wall: training seconds (`train_wall_time_s`), one thread"
        + (f", {args.jobs} runs at once on a shared 2-core machine." if args.jobs > 1 else "."),
        "",
        f"old = the committed file with `{' '.join(OLD)}`.",
        "",
        "| config | off_support | energy distance | wall s | per-seed off_support |",
        "|---|---|---|---|---|",
    ]
    for label in CONFIGS:
        rows = [r for r in results if r["label"] == label]
        off, off_se = mean_se([r["off"] for r in rows])
        en, en_se = mean_se([r["energy"] for r in rows])
        wall, wall_se = mean_se([r["wall"] for r in rows])
        per = ", ".join(f"{r['off']:.4f}" for r in rows)
        lines.append(f"| {label} | {off:.4f} +- {off_se:.4f} | {en:.5f} +- {en_se:.5f} | "
                     f"{wall:.0f} +- {wall_se:.0f} | {per} |")
    args.out.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines) + "\n"
    (args.out / "rf2d_sharpness.md").write_text(table)
    print(table)
    seed0 = {r["label"]: r["png"] for r in results if r["seed"] == 0}
    try:
        side_by_side(seed0[list(CONFIGS)[0]], seed0[list(CONFIGS)[1]], args.out / "rf2d_old_vs_new.png")
    except ImportError as exc:  # matplotlib missing: the table is the result
        print(f"no picture: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
