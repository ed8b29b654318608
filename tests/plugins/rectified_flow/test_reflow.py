"""Reflow: couplings from a trained run (reflow_pairs), training on them, and one-step generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import registry
from core.data import generator as make_generator
from core.run import run
from core.runs import load_run

ROOT = Path(__file__).resolve().parents[3]
ONE_RF = ROOT / "experiments" / "reflow_2d_1rf.toml"
TWO_RF = ROOT / "experiments" / "reflow_2d_2rf.toml"

TINY = ["trainer.steps=60", "trainer.batch_size=128", "trainer.log_every=20", "trainer.warmup_steps=0",
        "trainer.checkpoint_every=0", "trainer.progress=\"off\"", "backbone.hidden=32", "backbone.depth=2",
        "eval.num_samples=100", "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false", "solver.steps=4"]


def small(experiment: Path, folder: Path, keep_metrics: tuple[str, ...] = ("energy_distance", "few_step")) -> Path:
    """A copy of `experiment` whose [[metrics]] use 200 samples (and only the `keep_metrics` plugins)."""
    import tomli_w

    from core.config import read_toml

    raw = read_toml(experiment)
    raw["metrics"] = [{**m, **({"num_samples": 200} if "num_samples" in m else {})}
                      for m in raw.get("metrics", []) if m["plugin"] in keep_metrics]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / experiment.name
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def one_rf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reflow")
    out = root / "1rf"
    run(small(ONE_RF, root / "exp"), TINY, out=out)
    return out


def test_pairs_are_the_runs_own_ode_samples(one_rf):
    data = registry.build("data", {"plugin": "reflow_pairs", "run": str(one_rf), "num_pairs": 300, "batch_size": 128})
    assert data.spec.shape == (2,) and data.cache_file.is_file() and data.cache_file.parent == one_rf / "reflow"
    pairs = data.pairs
    assert pairs["x0"].shape == pairs["x1"].shape == (300, 2)
    loaded = load_run(one_rf, device="cpu")
    comps, model = loaded.components, loaded.model
    with torch.no_grad():
        again = comps.solver.sample(comps.objective.sampling_model(model.eval()), pairs["x0"][:128]).x
    assert torch.allclose(again, pairs["x1"][:128], atol=1e-5)
    # batches carry the source, indexed by step; the reference is the original data
    batch = next(data.train_batches(64, seed=0))
    assert set(batch) == {"x", "x0"} and batch["x"].shape == (64, 2)
    idx = [int((pairs["x0"] == row).all(1).nonzero()[0]) for row in batch["x0"][:5]]
    assert torch.equal(pairs["x1"][idx], batch["x"][:5])
    source = registry.build("data", {"plugin": "toy2d", "dataset": "eight_gaussians"})
    assert torch.equal(data.reference(50, make_generator(1))["x"], source.reference(50, make_generator(1))["x"])
    # the runner's sample metrics read reference_slice: the true data too, never the couplings' x_1
    assert torch.equal(data.reference_slice(40, 3, 10, 30)["x"], source.reference_slice(40, 3, 10, 30)["x"])


def test_pairs_are_cached_and_keyed(one_rf, monkeypatch):
    from plugins.rectified_flow.data import ReflowPairs

    first = registry.build("data", {"plugin": "reflow_pairs", "run": str(one_rf), "num_pairs": 200})

    def boom(*args, **kwargs):
        raise AssertionError("regenerated despite the cache")

    monkeypatch.setattr(ReflowPairs, "_generate", boom)
    second = registry.build("data", {"plugin": "reflow_pairs", "run": str(one_rf), "num_pairs": 200})
    assert torch.equal(first.pairs["x1"], second.pairs["x1"]) and second.cache_file == first.cache_file
    with pytest.raises((AssertionError, registry.PluginError), match="regenerated"):  # another solver is another key
        registry.build("data", {"plugin": "reflow_pairs", "run": str(one_rf), "num_pairs": 200,
                                "solver": {"method": "euler", "steps": 3}})


def test_solver_overrides_and_errors(one_rf, tmp_path):
    data = registry.build("data", {"plugin": "reflow_pairs", "run": str(one_rf), "num_pairs": 64, "cache": False,
                                   "solver": {"method": "euler", "steps": 1}})
    model = load_run(one_rf, device="cpu").model
    with torch.no_grad():
        one = data.pairs["x0"] + model.eval()(data.pairs["x0"], torch.zeros(64))
    assert torch.allclose(one, data.pairs["x1"], atol=1e-5)
    with pytest.raises(registry.ConfigError, match="cannot load the run to rectify .*run directory not found"):
        registry.build("data", {"plugin": "reflow_pairs", "run": str(tmp_path / "nothing")})
    with pytest.raises(registry.ConfigError, match="unknown key"):
        registry.build("data", {"plugin": "reflow_pairs", "run": str(one_rf), "solver": {"methd": "euler"}})


def test_two_rf_trains_on_the_pairs_and_reports_one_step_metrics(one_rf, tmp_path):
    summary = run(small(TWO_RF, tmp_path / "exp"), [*TINY, f"data.run=\"{one_rf}\"", f"trainer.init_from=\"{one_rf}\"",
                                                   "data.num_pairs=500"],
                  out=tmp_path / "2rf")
    metrics = summary["metrics"]
    assert {"energy_distance", "one_step/energy_distance", "one_step/nfe", "two_step/energy_distance"} <= set(metrics)
    assert metrics["one_step/nfe"] == 1.0 and metrics["two_step/nfe"] == 2.0
    assert "reflow_pairs" in (tmp_path / "2rf" / "config.toml").read_text()
    assert json.loads((tmp_path / "2rf" / "summary.json").read_text())["metrics"] == metrics


def test_one_step_solver_is_one_euler_step():
    solver = registry.build("solver", {"plugin": "one_step"})
    x0 = torch.randn(5, 3, dtype=torch.float64)
    calls = []

    def field(x, t, y=None):
        calls.append(t.clone())
        return torch.sin(x) + t[:, None]

    out = solver.sample(field, x0)
    assert out.nfe == 1 and len(calls) == 1 and torch.equal(calls[0], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(out.x, x0 + torch.sin(x0))


def test_class_conditional_runs_give_labelled_pairs(tmp_path):
    out = tmp_path / "digits"
    run(small(ROOT / "experiments" / "rf_digits.toml", tmp_path / "exp", keep_metrics=("energy_distance",)),
        ["trainer.steps=5", "trainer.batch_size=32", "trainer.log_every=5", "trainer.warmup_steps=0",
         "trainer.checkpoint_every=0", "trainer.progress=\"off\"", "backbone.hidden=16", "backbone.depth=1",
         "eval.num_samples=10", "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false",
         "solver.steps=2"], out=out)
    data = registry.build("data", {"plugin": "reflow_pairs", "run": str(out), "num_pairs": 40, "guidance_scale": 1.0})
    assert data.spec.num_classes == 10 and data.pairs["y"].shape == (40,)
    batch = next(data.train_batches(8, seed=0))
    assert set(batch) == {"x", "x0", "y"} and batch["x"].shape == (8, 1, 8, 8)
    # the metrics' trained feature network learns from the original digits, not from the 1-RF's samples
    options = {"plugin": "digits_cnn", "train_steps": 3, "feature_dim": 8, "cache_dir": str(tmp_path / "features")}
    original = data.source
    of_pairs = registry.build("feature_extractor", options, spec=data.spec, data=data)
    of_digits = registry.build("feature_extractor", options, spec=original.spec, data=original)
    assert data.evaluation_data is original and of_pairs.identity == of_digits.identity


@pytest.mark.slow
def test_two_rf_one_step_beats_one_rf(tmp_path):
    """The experiments, shortened: one euler step of the 2-RF is far closer to the data than one of the 1-RF."""
    # 400 steps of a width-128 MLP: ratio 0.105, 0.112, 0.121 on seeds 0, 1, 2 (about 10 s on one thread)
    short = ["trainer.steps=400", "trainer.checkpoint_every=0", "trainer.progress=\"off\"", "eval.num_samples=1000",
             "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false", "backbone.hidden=128"]
    first = run(ONE_RF, short, out=tmp_path / "1rf")
    # the 2-RF from scratch (trainer.init_from=''): the straightening is the couplings' alone
    second = run(TWO_RF, [*short, f"data.run=\"{tmp_path / '1rf'}\"", "trainer.init_from=''", "data.num_pairs=4000"],
                 out=tmp_path / "2rf")
    one, two = first["metrics"]["one_step/energy_distance"], second["metrics"]["one_step/energy_distance"]
    assert two < 0.25 * one, (one, two)


def test_grid_time_sampler_puts_t_on_the_k_step_grid():
    from core.rng import GlobalRandom
    from plugins.flow_matching.objective import FlowMatchingConfig, sample_times

    for k in (1, 2, 4):
        t = sample_times(FlowMatchingConfig(time_sampler="grid", grid_steps=k), 40000,
                         draw=GlobalRandom(40000, torch.Generator().manual_seed(k)), dtype=torch.float64)
        values, counts = torch.unique(t, return_counts=True)
        assert torch.equal(values, torch.arange(k, dtype=torch.float64) / k)
        assert (counts.double() / 40000 - 1 / k).abs().max() < 0.01
    with pytest.raises(registry.ConfigError, match="grid_steps"):
        registry.build("objective", {"plugin": "flow_matching", "time_sampler": "grid", "grid_steps": 0},
                       spec=registry.build("data", {"plugin": "toy2d"}).spec)


def test_one_step_distillation_loss_is_the_t0_regression():
    """grid_steps = 1 on couplings: the loss is mean || x_1 - x_0 - u(x_0, 0) ||^2 (Liu et al.'s distillation)."""
    from core.interfaces import DataSpec

    path = registry.build("path", {"plugin": "affine"}, scheduler=registry.build("scheduler", {"plugin": "cond_ot"}))
    obj = registry.build("objective", {"plugin": "velocity_mse", "time_sampler": "grid", "grid_steps": 1},
                         spec=DataSpec(shape=(2,)), path=path)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(32, 2, generator=g, dtype=torch.float64)
    seen = []

    def model(x, t, y=None):
        seen.append((x, t))
        return torch.sin(x) + t[:, None]

    loss, _ = obj.loss({"model": model}, {"x": x1, "x0": x0}, 0)
    assert torch.equal(seen[0][1], torch.zeros(32, dtype=torch.float64)) and torch.equal(seen[0][0], x0)
    assert torch.allclose(loss, (x1 - x0 - torch.sin(x0)).pow(2).mean())


def test_distillation_experiment_trains_on_the_runs_own_pairs(one_rf, tmp_path):
    summary = run(small(ROOT / "experiments" / "reflow_2d_distill.toml", tmp_path / "exp"),
                  [*TINY[:-1], f"data.run=\"{one_rf}\"", f"trainer.init_from=\"{one_rf}\"", "data.num_pairs=300",
                   "objective.grid_steps=2"],
                  out=tmp_path / "distill")
    assert {"energy_distance", "two_step/energy_distance"} <= set(summary["metrics"])
    assert summary["metrics"]["two_step/nfe"] == 2.0
