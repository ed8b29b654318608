"""Throughput of 1 vs 2 processes (accelerate launcher, gloo on CPU) at the same global batch.

    python benchmarks/distributed.py [--steps 150] [--repeats 3] [--experiments rectified_flow_2d,ddpm_digits]
                                     [--out docs/results/process_throughput.md] [--json]

For each experiment (its own model, data, objective and global batch ``trainer.batch_size``; evaluation
and checkpoints off) and each process count, a fresh ``python -m core.run`` trains `--steps` steps and its
``summary.json`` gives the training-loop steps/s (start-up and evaluation excluded); examples/s is
steps/s x the global batch. Variants: 1 process with ``cores`` torch threads (the same cores as 2
processes), 1 process with 1 thread, 2 processes with ``cores / 2`` threads each. They alternate `--repeats` times
and the table shows the median, so a load that drifts over the measurement hits both alike. The
ratio is 2-process / 1-process steps/s, measured in this one invocation; the machine's load average
is printed beside it (a shared machine slows both variants, unevenly). On a GPU machine pass
``--device cuda`` (one GPU per process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, table

NO_EVAL = ["metrics=[]", "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false",
           "trainer.checkpoint_every=0", "trainer.progress='off'", "trainer.warmup_steps=0"]


#: (processes, torch threads per process); 0 threads: the machine's cores / processes
VARIANTS = ((1, 0), (1, 1), (2, 0))


def threads(processes: int, per_process: int) -> int:
    return per_process or max(1, (os.cpu_count() or 1) // processes)


def measure(experiment: str, processes: int, per_process: int, steps: int, device: str, out: Path) -> float:
    """One fresh run's training-loop steps/s (from its summary.json)."""
    launcher = (f"launcher={{plugin='accelerate', num_processes={processes}, device='{device}', "
                f"threads_per_process={threads(processes, per_process)}}}")
    overrides = [*NO_EVAL, f"trainer.steps={steps}", launcher]
    run_dir = out / f"{experiment}-p{processes}"
    cmd = [sys.executable, "-m", "core.run", str(ROOT / "experiments" / f"{experiment}.toml"), "--out", str(run_dir),
           "--overwrite", *(a for kv in overrides for a in ("--set", kv))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads(processes, per_process))}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == processes, summary
    return summary["steps_per_s"]


def global_batch(experiment: str) -> int:
    import tomllib

    return int(tomllib.loads((ROOT / "experiments" / f"{experiment}.toml").read_text())["trainer"]["batch_size"])


def run_all(experiments: list[str], steps: int, repeats: int, device: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for experiment in experiments:
            speeds: dict[tuple[int, int], list[float]] = {v: [] for v in VARIANTS}
            for _ in range(repeats):
                for processes, per_process in VARIANTS:
                    speeds[processes, per_process].append(
                        measure(experiment, processes, per_process, steps, device, Path(tmp)))
            batch = global_batch(experiment)
            for (processes, per_process), values in speeds.items():
                median = statistics.median(values)
                rows.append({"experiment": experiment, "processes": processes,
                             "threads_per_process": threads(processes, per_process), "global_batch": batch,
                             "per_rank_batch": batch // processes, "steps_per_s": median,
                             "examples_per_s": median * batch, "all_steps_per_s": values})
    return rows


def render(rows: list[dict], steps: int, repeats: int, load: tuple[float, ...]) -> str:
    body = table(["experiment", "processes", "threads / process", "global batch", "per-rank batch", "steps/s",
                  "examples/s", "runs (steps/s)"],
                 [[r["experiment"], r["processes"], r["threads_per_process"], r["global_batch"], r["per_rank_batch"],
                   round(r["steps_per_s"], 1), round(r["examples_per_s"]),
                   ", ".join(f"{v:.1f}" for v in r["all_steps_per_s"])] for r in rows])
    ratios = []
    for experiment in dict.fromkeys(r["experiment"] for r in rows):
        mine = [r for r in rows if r["experiment"] == experiment]
        two = next(r for r in mine if r["processes"] == 2)["steps_per_s"]
        ratios.append(f"{experiment}: " + ", ".join(
            f"{two / r['steps_per_s']:.2f}x vs 1 process x {r['threads_per_process']} thread(s)"
            for r in mine if r["processes"] == 1))
    return (f"{body}\n\nspeed-up of 2 processes (median steps/s): {'; '.join(ratios)}.\n"
            f"{steps} steps per run, {repeats} alternating runs per variant, {os.cpu_count()} CPU cores, "
            f"load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experiments", default="rectified_flow_2d,ddpm_digits")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    before = os.getloadavg()[0]
    rows = run_all(args.experiments.split(","), args.steps, args.repeats, args.device)
    text = render(rows, args.steps, args.repeats, (before, os.getloadavg()[0]))
    if args.out:
        title = "# 1 vs 2 processes at the same global batch (`benchmarks/distributed.py`)"
        Path(args.out).write_text(f"{title}\n\n{text}")
    print(json.dumps(rows) if args.json else text)


if __name__ == "__main__":
    main()
