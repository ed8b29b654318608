"""The discrete flow experiments run end to end in short mode and write their metrics and samples."""

from __future__ import annotations

import json
import math

import pytest

from core.run import run

from ..conftest import ROOT

EXPERIMENTS = ROOT / "experiments"
SHORT = ["trainer.steps=6", "trainer.log_every=3", "trainer.warmup_steps=0", "trainer.checkpoint_every=0",
         "solver.steps=4"]


def finite(values: dict, *keys: str) -> None:
    for key in keys:
        assert key in values and math.isfinite(values[key]), (key, values)


def test_discrete_2d_short(tmp_path):
    out = tmp_path / "d2"
    summary = run(EXPERIMENTS / "discrete_flow_2d.toml",
                  [*SHORT, "backbone.hidden=32", "backbone.depth=2", "eval.num_samples=200",
                   "eval.num_pictures=200"], out=out)
    finite(summary["metrics"], "energy_distance", "sliced_wasserstein", "discrete_elbo/bits_per_token")
    finite(summary["floor"], "energy_distance", "sliced_wasserstein")
    assert json.loads((out / "summary.json").read_text())["metrics"] == summary["metrics"]
    assert (out / "samples" / "final.png").stat().st_size > 1000
    assert summary["nfe"] == 4


def test_discrete_digits_short(tmp_path):
    out = tmp_path / "digits"
    summary = run(EXPERIMENTS / "discrete_flow_digits.toml",
                  [*SHORT, "backbone.hidden=32", "backbone.depth=1", "eval.num_samples=50", "eval.num_pictures=20",
                   "eval.untrained=false"], out=out)
    finite(summary["metrics"], "energy_distance", "discrete_elbo/bits_per_token")
    assert (out / "samples" / "final.png").stat().st_size > 500


def test_discrete_text_short(tmp_path):
    out = tmp_path / "text"
    summary = run(EXPERIMENTS / "discrete_flow_text.toml",
                  [*SHORT, "backbone.hidden_size=16", "backbone.depth=1", "backbone.num_heads=2",
                   "eval.num_pictures=3"], out=out)
    finite(summary["metrics"], "discrete_elbo/bits_per_token", "discrete_infill/accuracy")
    samples = (out / "samples" / "final.txt").read_text(encoding="utf-8")
    assert samples.count("===== sample") == 3
    infill = (out / "samples" / "final-infill.txt").read_text(encoding="utf-8")
    assert infill.count("--- infilled ---") == 8 and "\u00ab" in infill


@pytest.mark.slow
def test_discrete_2d_learns_the_checkerboard(tmp_path):
    """A shortened 2D run is already near the data floor and far better than the untrained model
    (which samples uniform bins: energy distance about 4x the floor at 2000 samples), and its
    likelihood bound is near the 6.5 bits per coordinate of the quantised checkerboard."""
    summary = run(EXPERIMENTS / "discrete_flow_2d.toml",
                  ["trainer.steps=600", "trainer.checkpoint_every=0", "eval.num_samples=2000", "eval.num_pictures=500"],
                  out=tmp_path / "d2")
    trained, untrained = summary["metrics"]["energy_distance"], summary["untrained"]["energy_distance"]
    floor = summary["floor"]["energy_distance"]
    assert untrained >= 2.5 * trained, summary
    assert trained <= 2 * floor, summary
    assert summary["metrics"]["discrete_elbo/bits_per_token"] < 6.8 < summary["untrained"]["discrete_elbo/bits_per_token"]
