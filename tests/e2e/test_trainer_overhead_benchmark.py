"""benchmarks/trainer_overhead.py: the interleaved timing runs the plain loop inside a real flowforge run, in
blocks, through the trainer's step_end event, and counts the steps of each side as its docstring says."""

from __future__ import annotations

import math
import sys

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import trainer_overhead as bench  # noqa: E402


def test_the_plain_loop_alternates_with_the_trainer_in_blocks(tmp_path, monkeypatch):
    calls = []
    run = bench.PlainLoop.run

    def spy(self, n):
        calls.append((self.step, n))
        return run(self, n)

    monkeypatch.setattr(bench.PlainLoop, "run", spy)
    timing, summary = bench.interleaved_pair("mlp-2d", 20, 5, tmp_path / "run")
    assert summary["steps"] == 20
    # after trainer steps 5, 10, 15, 20: the next 5 plain steps each (after the warm-up call with n = 0)
    assert calls == [(0, 0), (0, 5), (5, 5), (10, 5), (15, 5)] and timing.plain.step == 20
    assert timing.plain_steps == 20 and timing.trainer_steps == 15  # the trainer's first block (start-up) is not counted
    assert timing.trainer_s > 0 and timing.plain_s > 0 and math.isfinite(timing.time_ratio())


def test_the_plain_vs_plain_alternation_times_both_loops():
    ratio = bench.plain_pair("mlp-2d", 20, 5)
    assert math.isfinite(ratio) and ratio > 0
