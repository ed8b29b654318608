"""The main job: experiments/rectified_flow_2d.toml learns the checkerboard.

A shortened run (fewer steps, smaller model) must already be at least 5x better
than the untrained model and within 3x of the data-vs-data floor on the energy
distance; the full file is run by the README's main command.
"""

from __future__ import annotations

import json

from core.run import run

from ..conftest import RF2D


def test_short_run_meets_the_thresholds(tmp_path):
    summary = run(RF2D, ["trainer.steps=1500", "trainer.checkpoint_every=0", "trainer.log_every=100",
                         "eval.num_samples=2000", "eval.num_pictures=500"], out=tmp_path / "rf")
    trained = summary["metrics"]["energy_distance"]
    untrained = summary["untrained"]["energy_distance"]
    floor = summary["floor"]["energy_distance"]
    assert untrained >= 5 * trained, summary
    assert trained <= 3 * floor, summary
    assert json.loads((tmp_path / "rf" / "summary.json").read_text())["metrics"]["energy_distance"] == trained
    assert (tmp_path / "rf" / "samples" / "final.png").stat().st_size > 1000
