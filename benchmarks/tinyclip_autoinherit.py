"""TinyCLIP automatic inheritance on the shapes data: teacher -> masked distillation (clip_l0 +
tinyclip_l0) -> prune -> distillation of the dense pruned student, against the same architecture
trained from scratch for the same number of steps as the pruned student's last stage.

    python benchmarks/tinyclip_autoinherit.py OUT [--sparsity 0.5] [--mask-steps 200] [--steps 80]

Prints a markdown table (zero-shot top-1 on the held-out shapes, parameters, steps) and writes
``OUT/autoinherit.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEDIUM = ["data.train_size=2000", "data.held_out_size=500", "trainer.log_every=40"]


def _top1(summary: dict) -> float:
    return summary.get("metrics", {}).get("zero_shot/top1", float("nan"))


def main() -> int:
    from core.run import run
    from plugins.tinyclip.autoinherit import prune_run
    from plugins.tinyclip.prune import backbone_options
    from plugins.tinyclip.table import parameters

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    out, exp = Path(args.out), ROOT / "experiments"
    teacher = (out / "teacher").as_posix()
    rows = []
    s = run(exp / "tinyclip_teacher.toml", [*MEDIUM, f"trainer.steps={args.teacher_steps}"], out=out / "teacher",
            overwrite=True)
    rows.append(("teacher", parameters(out / "teacher"), s["steps"], _top1(s)))
    masked = [*MEDIUM, f"trainer.steps={args.mask_steps}", 'backbone.plugin="clip_l0"', "backbone.depth=4",
              f'backbone.inherit_from="{teacher}"', 'objective.plugin="tinyclip_l0"', f'objective.teacher="{teacher}"',
              f"backbone.target_sparsity={args.sparsity}", f"backbone.sparsity_warmup={args.mask_steps // 2}",
              "backbone.mask_lr=0.05"]
    s = run(exp / "tinyclip_distill.toml", masked, out=out / "masked", overwrite=True)
    rows.append(("masked (clip_l0)", parameters(out / "masked"), s["steps"], _top1(s)))
    student = prune_run(str(out / "masked"), str(out / "pruned"))
    arch = [f"backbone.{k}={json.dumps(v)}" for k, v in backbone_options(student).items() if k != "plugin"]
    auto = [*MEDIUM, f"trainer.steps={args.steps}", *arch, f'backbone.inherit_from="{(out / "pruned").as_posix()}"',
            'backbone.inherit_weights="model"', f'objective.teacher="{teacher}"']
    s = run(exp / "tinyclip_distill.toml", auto, out=out / "auto", overwrite=True)
    rows.append(("automatic inheritance", parameters(out / "auto"), s["steps"], _top1(s)))
    s = run(exp / "tinyclip_scratch.toml", [*MEDIUM, f"trainer.steps={args.steps}", *arch], out=out / "scratch",
            overwrite=True)
    rows.append(("same student, scratch", parameters(out / "scratch"), s["steps"], _top1(s)))
    table = ["| run | params | steps | zero-shot top-1 |", "|---|---|---|---|"]
    table += [f"| {name} | {p:,} | {steps} | {100 * top1:.1f} |" for name, p, steps, top1 in rows]
    print("\n".join(table))
    (out / "autoinherit.json").write_text(json.dumps({"rows": rows, "student": backbone_options(student)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
