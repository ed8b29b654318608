"""TinyCLIP on the shapes data: teacher, manual inheritance, automatic inheritance and scratch.

    python benchmarks/tinyclip_autoinherit.py OUT [--sparsity 0.5] [--mask-steps 200] [--steps 80]
                                                  [--manual-depth 3]

* teacher: ``tinyclip_teacher.toml`` (4 blocks per tower);
* automatic inheritance: the teacher under L0 masks (clip_l0 + tinyclip_l0) for ``--mask-steps``,
  pruned (`plugins.tinyclip.autoinherit.prune_run`), then the dense student distilled for ``--steps``;
* manual inheritance: a uniform student of ``--manual-depth`` blocks per tower at the teacher's width,
  initialised by `plugins.tinyclip.inherit` (every k-th teacher block, k = 4 // depth) and distilled
  (``tinyclip_distill.toml``) for ``--steps`` and for ``--mask-steps + --steps`` (the automatic
  pipeline's steps after the teacher);
* scratch: the automatic student's architecture trained contrastively from random weights for ``--steps``.

Prints a markdown table (params, steps, zero-shot top-1 on the held-out shapes, wall time) and writes
``OUT/autoinherit.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEDIUM = ["data.train_size=2000", "data.held_out_size=500", "trainer.log_every=40"]
EXP = ROOT / "experiments"


def _row(name: str, file: str, overrides: list[str], out: Path) -> tuple:
    """Run ``EXP/file`` with `overrides` into ``out`` and return (name, params, steps, top-1, wall s)."""
    from core.run import run
    from plugins.tinyclip.table import parameters

    start = time.perf_counter()
    s = run(EXP / file, [*MEDIUM, *overrides], out=out, overwrite=True)
    top1 = s.get("metrics", {}).get("zero_shot/top1", float("nan"))
    return name, parameters(out), s["steps"], top1, round(time.perf_counter() - start, 1)


def main() -> int:
    from plugins.tinyclip.autoinherit import prune_run
    from plugins.tinyclip.prune import backbone_options

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--manual-depth", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    teacher = (out / "teacher").as_posix()
    distil = [f'objective.teacher="{teacher}"']
    rows = [_row("teacher", "tinyclip_teacher.toml", [f"trainer.steps={args.teacher_steps}"], out / "teacher")]
    masked = [f"trainer.steps={args.mask_steps}", 'backbone.plugin="clip_l0"', "backbone.depth=4",
              f'backbone.inherit_from="{teacher}"', 'objective.plugin="tinyclip_l0"', *distil,
              f"backbone.target_sparsity={args.sparsity}", f"backbone.sparsity_warmup={args.mask_steps // 2}",
              "backbone.mask_lr=0.05"]
    rows.append(_row("masked (clip_l0)", "tinyclip_distill.toml", masked, out / "masked"))
    student = prune_run(str(out / "masked"), str(out / "pruned"))
    arch = [f"backbone.{k}={json.dumps(v)}" for k, v in backbone_options(student).items() if k != "plugin"]
    auto = [f"trainer.steps={args.steps}", *arch, f'backbone.inherit_from="{(out / "pruned").as_posix()}"',
            'backbone.inherit_weights="model"', *distil]
    rows.append(_row("automatic inheritance", "tinyclip_distill.toml", auto, out / "auto"))
    manual = [f"backbone.depth={args.manual_depth}", f'backbone.inherit_from="{teacher}"', *distil]
    for steps in (args.steps, args.mask_steps + args.steps):
        rows.append(_row("manual inheritance", "tinyclip_distill.toml", [f"trainer.steps={steps}", *manual],
                         out / f"manual-{steps}"))
    rows.append(_row("same student as automatic, scratch", "tinyclip_scratch.toml",
                     [f"trainer.steps={args.steps}", *arch], out / "scratch"))
    table = ["| run | params | steps | zero-shot top-1 | wall s |", "|---|---|---|---|---|"]
    table += [f"| {name} | {p:,} | {steps} | {100 * top1:.1f} | {wall:.0f} |" for name, p, steps, top1, wall in rows]
    print("\n".join(table))
    (out / "autoinherit.json").write_text(json.dumps({"rows": rows, "student": backbone_options(student)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
