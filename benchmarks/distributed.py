"""Throughput of 1 vs 2 processes (accelerate launcher, gloo on CPU) on the same experiment and global batch.

    python benchmarks/distributed.py [--steps 300] [--json]

Prints steps/s and examples/s for each process count and the speed-up ratio (2-process / 1-process),
measured in this one invocation. On a CPU machine the two processes share the cores, so the ratio says
what data parallelism costs or gains here; on a machine with GPUs set --device cuda.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(processes: int, steps: int, batch: int, device: str, out: Path) -> dict:
    from core.run import run

    launcher = f"launcher={{plugin='accelerate', num_processes={processes}, device='{device}'}}"
    summary = run(ROOT / "experiments" / "rectified_flow_2d.toml",
                  [f"trainer.steps={steps}", f"trainer.batch_size={batch}", "trainer.progress='off'",
                   "eval.untrained=false", "eval.floor=false", "metrics=[]", "eval.num_pictures=0", launcher],
                  out=out / f"p{processes}", overwrite=True)
    return {"processes": processes, "steps_per_s": summary["steps_per_s"],
            "examples_per_s": summary["steps_per_s"] * batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(p, args.steps, args.batch, args.device, Path(tmp)) for p in (1, 2)]
    ratio = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    if args.json:
        print(json.dumps({"rows": rows, "speedup_2_vs_1": ratio}))
        return
    print(f"rectified_flow_2d, global batch {args.batch}, {args.steps} steps")
    print("| processes | steps/s | examples/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['steps_per_s']:.1f} | {r['examples_per_s']:.0f} |")
    print(f"speed-up 2 vs 1 process: {ratio:.2f}x")


if __name__ == "__main__":
    main()
