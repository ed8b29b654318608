"""The TinyCLIP comparison: teacher, distilled student, student trained from scratch.

``compare(out)`` runs ``experiments/tinyclip_teacher.toml`` into ``out/teacher``,
then ``tinyclip_distill.toml`` (teacher and weight inheritance pointed at
``out/teacher``) into ``out/distilled`` and ``tinyclip_scratch.toml`` into
``out/scratch``, each through the runner (``core.runs.train``), and returns one
row per run read from its ``summary.json`` and checkpoint. ``markdown(rows)``
formats them. ``benchmarks/tinyclip_table.py`` is the command-line front end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
RUNS = (("teacher", "tinyclip_teacher.toml"), ("distilled", "tinyclip_distill.toml"),
        ("scratch", "tinyclip_scratch.toml"))
#: Overrides of ``--short``: a smoke test of the whole recipe in well under a minute of compute.
SHORT = ("trainer.steps=40", "trainer.warmup_steps=5", "trainer.log_every=20", "data.train_size=512",
         "data.held_out_size=200")
COLUMNS = ("top1", "top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


def parameters(run_dir: Path) -> int:
    """Number of model parameters in the run's newest checkpoint."""
    from core import checkpoint as ckpt

    state = ckpt.load(ckpt.latest(run_dir / "checkpoints"))
    return sum(v.numel() for v in state["model"].values())


def compare(out: str | Path, overrides: Sequence[str] = (), short: bool = False,
            teacher_overrides: Sequence[str] = (), student_overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run the three experiments into `out` and return a row per run.

    Args:
        out: folder for the three run directories (replaced if they exist).
        overrides: ``--set`` overrides applied to all three runs.
        short: add the `SHORT` overrides first.
        teacher_overrides: overrides applied to the teacher run only.
        student_overrides: overrides applied to the two student runs only.
    """
    from core.runs import train

    out = Path(out)
    common = [*(SHORT if short else ()), *overrides]
    teacher = out / "teacher"
    extra = {"teacher": list(teacher_overrides), "scratch": list(student_overrides),
             "distilled": [*student_overrides, f'backbone.inherit_from="{teacher.as_posix()}"',
                           f'objective.teacher="{teacher.as_posix()}"']}
    rows = []
    for name, file in RUNS:
        start = time.perf_counter()
        summary = train(EXPERIMENTS / file, [*common, *extra[name]], out=out / name, overwrite=True)
        wall = time.perf_counter() - start
        metrics = summary.get("metrics", {})
        rows.append({
            "run": name, "parameters": parameters(out / name), "steps": summary["steps"], "wall_s": round(wall, 1),
            **{k: metrics.get(f"zero_shot/{k}", float("nan")) for k in COLUMNS},
            "untrained_top1": summary.get("untrained", {}).get("zero_shot/top1", float("nan")),
        })
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "table.md").write_text(markdown(rows))
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of `compare`'s rows (metrics in percent)."""
    head = ("run", "params", "steps", "zero-shot top-1", "top-5", "I->T R@1", "I->T R@5", "T->I R@1", "T->I R@5",
            "top-1 at init", "wall s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], f"{r['parameters']:,}", str(r["steps"]), *(f"{100 * r[k]:.1f}" for k in COLUMNS),
                 f"{100 * r['untrained_top1']:.1f}", f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
