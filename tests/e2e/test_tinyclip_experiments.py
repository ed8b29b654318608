"""The TinyCLIP experiments in short mode: teacher -> distilled / scratch students, and progressive stages."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import registry
from core import checkpoint as ckpt
from core.run import run
from plugins.tinyclip.table import COLUMNS, SHORT, compare, markdown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SHORT_STAGES = [*SHORT, "trainer.steps=15", "trainer.log_every=5"]


#: A shortened comparison (about a minute of compute): a teacher trained for 400 steps, students for 80.
MEDIUM = ["data.train_size=2000", "data.held_out_size=500", "trainer.log_every=40"]
TEACHER_STEPS = ["trainer.steps=400"]
STUDENT_STEPS = ["trainer.steps=80", "trainer.warmup_steps=10"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinyclip")
    return out, compare(out, MEDIUM, teacher_overrides=TEACHER_STEPS, student_overrides=STUDENT_STEPS)


@pytest.mark.slow
def test_distillation_beats_training_from_scratch(table):
    _, rows = table
    teacher, distilled, scratch = rows
    assert teacher["top1"] > 0.8, rows
    # weight inheritance: the distilled student starts far above chance (1/24), the scratch one at chance
    assert distilled["untrained_top1"] > scratch["untrained_top1"] + 0.1, rows
    for key in ("top1", "i2t_r1", "t2i_r1"):
        assert distilled[key] > scratch[key], (key, rows)
    assert distilled["top1"] > scratch["top1"] + 0.05, rows


@pytest.mark.slow
def test_three_runs_write_a_table(table):
    out, rows = table
    assert [r["run"] for r in rows] == ["teacher", "distilled", "scratch"]
    teacher, distilled, scratch = rows
    assert teacher["parameters"] > 1.5 * distilled["parameters"]
    assert distilled["parameters"] == scratch["parameters"] and distilled["steps"] == scratch["steps"] == 80
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in COLUMNS), r
        summary = json.loads((out / r["run"] / "summary.json").read_text())
        assert set(summary["metrics"]) == {f"zero_shot/{k}" for k in COLUMNS}
    text = (out / "table.md").read_text()
    assert text == markdown(rows) and text.count("\n") == 5 and "| distilled |" in text
    config = (out / "distilled" / "config.toml").read_text()
    assert "tinyclip_distill" in config and str((out / "teacher").as_posix()) in config


@pytest.mark.slow
def test_inherit_from_a_run_directory_copies_its_ema_weights(table):
    out, _ = table
    teacher_dir = out / "teacher"
    data = registry.build("data", {"plugin": "clip_shapes", "train_size": 8, "held_out_size": 8})
    backbone = tomllib.loads((teacher_dir / "config.toml").read_text())["backbone"]
    model = registry.build("backbone", {**backbone, "inherit_from": str(teacher_dir)}, spec=data.spec)
    ema = ckpt.load(ckpt.latest(teacher_dir / "checkpoints"))["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    model = registry.build("backbone", {**backbone, "inherit_from": str(teacher_dir), "inherit_weights": "model"},
                           spec=data.spec)
    raw = ckpt.load(ckpt.latest(teacher_dir / "checkpoints"))["model"]
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


def test_progressive_stages_run_and_chain(tmp_path):
    summary = run(ROOT / "experiments" / "tinyclip_progressive.toml", SHORT_STAGES, out=tmp_path / "prog")
    stages = summary["stages"]
    assert len(stages) == 3 and all(s["steps"] == 15 for s in stages)
    assert all(math.isfinite(s["metrics"]["zero_shot/top1"]) for s in stages)
    names = ["0-teacher", "1-w75", "2-w50"]
    params = [sum(v.numel() for v in ckpt.load(ckpt.latest(tmp_path / "prog" / n / "checkpoints"))["model"].values())
              for n in names]
    assert params[0] > params[1] > params[2]
    last = (tmp_path / "prog" / "2-w50" / "config.toml").read_text()
    assert f'inherit_from = "{(tmp_path / "prog" / "1-w75").as_posix()}"' in last.replace("\\\\", "/")
    assert "0-teacher" in last


def test_benchmark_script_help():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tinyclip_table.py"), "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--short" in proc.stdout
