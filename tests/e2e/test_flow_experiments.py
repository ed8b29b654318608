"""The flow-matching experiment files: documented, valid, and runnable end to end (shortened);
and the few_step metric they use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import registry
from core.config import load
from core.data import TensorDataSource
from core.interfaces import DataSpec
from core.run import run

ROOT = Path(__file__).resolve().parents[2]
FILES = ["rf_digits.toml", "reflow_2d_1rf.toml", "reflow_2d_2rf.toml", "reflow_2d_distill.toml", "likelihood_2d.toml"]


@pytest.mark.parametrize("name", FILES)
def test_experiment_is_documented_and_valid(name):
    path = ROOT / "experiments" / name
    header = path.read_text().splitlines()[:5]
    assert header[0].startswith("# ") and any("python -m core.run" in line for line in header)
    exp = load(path)
    assert exp.components["objective"]["plugin"] in ("velocity_mse", "flow_matching")


def test_likelihood_experiment_reports_nll_by_three_estimators(tmp_path):
    from ..plugins.rectified_flow.test_reflow import small

    summary = run(small(ROOT / "experiments" / "likelihood_2d.toml", tmp_path / "exp",
                        keep_metrics=("energy_distance", "likelihood")),
                  ["trainer.steps=30", "trainer.batch_size=128", "trainer.checkpoint_every=0", "trainer.progress=\"off\"",
                   "backbone.hidden=32", "backbone.depth=2", "eval.num_samples=100", "eval.num_pictures=0",
                   "eval.untrained=false", "eval.floor=false"], out=tmp_path / "run")
    m = summary["metrics"]
    for name in ("likelihood", "hutchinson", "rk4_8"):
        assert {f"{name}/nll", f"{name}/bpd", f"{name}/nfe"} <= set(m)
    assert m["rk4_8/nfe"] == 32.0
    assert m["likelihood/nll"] == pytest.approx(m["rk4_8/nll"], abs=0.1)
    assert m["likelihood/nll"] == pytest.approx(m["hutchinson/nll"], abs=0.3)


def test_few_step_metric_scores_one_step_samples():
    spec = DataSpec(shape=(2,))
    g = torch.Generator().manual_seed(0)
    held = {"x": torch.randn(500, 2, generator=g) * 0.5 + 3.0}
    data = TensorDataSource(held, held, spec)

    class Shift(torch.nn.Module):  # u(x, 0) = 3 - 0.5 x: one euler step maps N(0, I) to N(3, 0.25 I)
        def forward(self, x, t, y=None):
            return 3.0 - 0.5 * x

    metric = registry.build("metric", {"plugin": "few_step", "num_samples": 500, "distance": {
        "plugin": "sliced_wasserstein", "projections": 64}}, spec=spec, data=data)
    good = metric.evaluate(Shift(), data, torch.Generator().manual_seed(1))
    assert good["nfe"] == 1.0 and good["sliced_wasserstein"] < 0.1

    class Zero(torch.nn.Module):
        def forward(self, x, t, y=None):
            return torch.zeros_like(x)

    bad = metric.evaluate(Zero(), data, torch.Generator().manual_seed(1))
    assert bad["sliced_wasserstein"] > 1.0
    with pytest.raises(registry.ConfigError, match="not a sample metric"):
        registry.build("metric", {"plugin": "few_step", "distance": "likelihood"}, spec=spec, data=data)
