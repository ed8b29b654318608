"""Likelihoods by the instantaneous change of variables: exact against closed forms, Hutchinson unbiased,
gradients, and the likelihood metric plugin."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.data import TensorDataSource
from core.interfaces import DataSpec
from core.testing.strategies import seeds
from plugins.flow_matching.analytic import GaussianFlow
from plugins.flow_matching.likelihood import divergence, log_likelihood
from plugins.flow_matching.scheduler import (
    CondOTScheduler,
    CosineScheduler,
    PolynomialConfig,
    PolynomialConvexScheduler,
)

SCHEDULERS = st.one_of(st.just(CondOTScheduler()), st.just(CosineScheduler()),
                       st.floats(1.0, 3.0).map(lambda n: PolynomialConvexScheduler(PolynomialConfig(n=n))))


def gaussian(dim: int, seed: int, scheduler, prediction: str = "velocity") -> GaussianFlow:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    mean = torch.randn(dim, generator=g, dtype=torch.float64)
    return GaussianFlow(mean, a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64), scheduler, prediction)


@settings(max_examples=15, deadline=None)
@given(scheduler=SCHEDULERS, dim=st.integers(1, 5), seed=seeds())
def test_gaussian_likelihood_matches_the_closed_form(scheduler, dim, seed):
    """log p_1(x) under the analytic velocity of N(mu, Sigma) equals log N(x; mu, Sigma) to 1e-3 nats/dim."""
    model = gaussian(dim, seed, scheduler)
    x = model.sample(8, torch.Generator().manual_seed(seed + 1))
    res = log_likelihood(model, x, method="dopri5", atol=1e-7, rtol=1e-7)
    exact = model.log_prob(x)
    assert ((res.log_prob - exact).abs() / dim).max().item() < 1e-3
    assert torch.allclose(res.bits_per_dim, -exact / (dim * math.log(2)), atol=1e-3)
    assert res.log_prob.shape == (8,) and res.x_0.shape == x.shape and res.nfe > 0


def test_fixed_step_likelihood_converges():
    model = gaussian(3, 0, CondOTScheduler())
    x = model.sample(16, torch.Generator().manual_seed(1))
    exact = model.log_prob(x)
    errs = [(log_likelihood(model, x, method="rk4", steps=n).log_prob - exact).abs().max().item() for n in (8, 16, 32)]
    assert errs[0] > 10 * errs[1] and errs[1] > 10 * errs[2] and errs[2] < 1e-5  # order 4: about 16x per halving


@pytest.mark.parametrize("prediction", ["epsilon", "x1"])
def test_likelihood_of_a_converted_prediction(prediction):
    """An epsilon- or x1-predicting model, converted by the path, has the same likelihood."""
    from plugins.flow_matching.path import AffinePath
    from plugins.flow_matching.transforms import PredictionToVelocity

    scheduler = CosineScheduler()
    model = gaussian(2, 3, scheduler, prediction)
    field = PredictionToVelocity(model, AffinePath(scheduler), prediction, eps=1e-4)
    x = model.sample(8, torch.Generator().manual_seed(2))
    res = log_likelihood(field, x, method="dopri5", atol=1e-8, rtol=1e-8)
    assert ((res.log_prob - model.log_prob(x)).abs() / 2).max().item() < 1e-3


def test_hutchinson_agrees_with_exact_within_its_standard_error():
    dim, reps = 6, 400
    model = gaussian(dim, 5, CondOTScheduler())
    x = model.sample(3, torch.Generator().manual_seed(6))
    exact = log_likelihood(model, x, method="rk4", steps=12, estimator="exact").log_prob
    xs = x.repeat_interleave(reps, dim=0)
    for probe in ("rademacher", "gaussian"):
        est = log_likelihood(model, xs, method="rk4", steps=12, estimator="hutchinson", probe=probe,
                             generator=torch.Generator().manual_seed(7)).log_prob.reshape(3, reps)
        mean, se = est.mean(1), est.std(1) / math.sqrt(reps)
        assert (se > 0).all()
        assert ((mean - exact).abs() <= 4 * se).all(), (probe, mean, exact, se)
    many = log_likelihood(model, x, method="rk4", steps=12, estimator="hutchinson", num_probes=reps,
                          generator=torch.Generator().manual_seed(8)).log_prob
    assert (many - exact).abs().max().item() < 0.5


def test_divergence_exact_and_estimated_on_a_linear_field():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    u, div = divergence(lambda x, t, y: x @ a.T, x, torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(div, torch.full((4,), torch.trace(a).item(), dtype=torch.float64))
    assert torch.allclose(u, x @ a.T)
    z = torch.randn(2000, 4, 5, generator=g, dtype=torch.float64)
    _, est = divergence(lambda x, t, y: x @ a.T, x, torch.zeros(4, dtype=torch.float64), probes=z)
    assert torch.allclose(est, div, atol=0.5)


def test_gradients_with_respect_to_the_data_are_the_score():
    model = gaussian(2, 1, CondOTScheduler())
    x = model.sample(4, torch.Generator().manual_seed(2)).requires_grad_(True)
    res = log_likelihood(model, x, method="rk4", steps=40, grad=True)
    (grad,) = torch.autograd.grad(res.log_prob.sum(), x)
    xe = x.detach().requires_grad_(True)
    (score,) = torch.autograd.grad(model.log_prob(xe).sum(), xe)
    assert torch.allclose(grad, score, atol=1e-4)
    # without grad=True nothing is kept
    assert not log_likelihood(model, x.detach(), method="euler", steps=2).log_prob.requires_grad


def test_gradients_with_respect_to_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def field(x, t, y=None):
        return net(torch.cat([x, t[:, None]], dim=1))

    x = torch.randn(5, 2, dtype=torch.float64)
    res = log_likelihood(field, x, method="midpoint", steps=6, grad=True)
    res.log_prob.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # matches a finite difference in one parameter
    p = net[0].bias
    g = p.grad[0].item()
    with torch.no_grad():
        p[0] += 1e-6
        up = log_likelihood(field, x, method="midpoint", steps=6).log_prob.mean().item()
        p[0] -= 2e-6
        down = log_likelihood(field, x, method="midpoint", steps=6).log_prob.mean().item()
        p[0] += 1e-6
    assert g == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-7)


def _gaussian_source(model: GaussianFlow, n: int = 600) -> TensorDataSource:
    g = torch.Generator().manual_seed(0)
    train, held = model.sample(n, g).float(), model.sample(n, g).float()
    return TensorDataSource({"x": train}, {"x": held}, DataSpec(shape=(model.dim,)))


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_metric_plugin_reports_the_nll_of_held_out_data(estimator):
    model = gaussian(2, 4, CondOTScheduler()).float()
    data = _gaussian_source(model)
    metric = registry.build("metric", {"plugin": "likelihood", "scheduler": "cond_ot", "estimator": estimator,
                                       "num_samples": 300, "batch_size": 150, "dtype": "float64", "num_probes": 4},
                            spec=data.spec, data=data)
    out = metric.evaluate(model, data, torch.Generator().manual_seed(1))
    ref = data.reference(300, torch.Generator().manual_seed(1))["x"].double()
    exact = -model.double().log_prob(ref).mean().item()
    assert set(out) >= {"nll", "nll_per_dim", "bpd", "bpd_stderr", "nfe"}
    tol = 1e-3 if estimator == "exact" else 5 * out["bpd_stderr"] * 2 * math.log(2)
    assert out["nll"] == pytest.approx(exact, abs=tol)
    assert out["bpd"] == pytest.approx(out["nll"] / (2 * math.log(2)))


def test_metric_plugin_validates_and_converts_predictions():
    with pytest.raises(registry.ConfigError, match="unknown scheduler plugin"):
        registry.build("metric", {"plugin": "likelihood", "scheduler": "cosin"})
    with pytest.raises(registry.ConfigError, match="continuous data"):
        registry.build("metric", {"plugin": "likelihood"}, spec=DataSpec(shape=(4,), kind="discrete", vocab_size=3))
    model = gaussian(2, 4, CosineScheduler(), "epsilon")
    data = _gaussian_source(model)
    metric = registry.build("metric", {"plugin": "likelihood", "scheduler": "cosine", "prediction": "epsilon",
                                       "num_samples": 100, "dtype": "float64", "sampling_eps": 1e-5},
                            spec=data.spec, data=data)
    out = metric.evaluate(model, data, torch.Generator().manual_seed(1))
    ref = data.reference(100, torch.Generator().manual_seed(1))["x"].double()
    assert out["nll"] == pytest.approx(-model.log_prob(ref).mean().item(), abs=2e-3)


def test_inside_a_run_the_metric_integrates_the_runs_own_objective(tmp_path, capsys):
    """A run trained with the cosine scheduler and epsilon prediction: the likelihood metric at its defaults
    is the likelihood of that model (the independent conversion with the run's scheduler and prediction), not
    of the network read as a cond_ot velocity; a contradicting prediction or scheduler is exit 2."""
    from core.cli import main as cli
    from core.run import main as run_main
    from core.runs import load_run
    from tests.conftest import RF2D, TINY_RF2D

    out = tmp_path / "eps"
    sets = [a for kv in (*TINY_RF2D, "scheduler.plugin='cosine'", "objective.prediction='epsilon'", "metrics=[]")
            for a in ("--set", kv)]
    assert run_main([str(RF2D), "--out", str(out), *sets]) == 0
    run = load_run(out, device="cpu")
    c = run.components
    options = {"plugin": "likelihood", "num_samples": 64, "batch_size": 64, "method": "rk4", "steps": 16}
    in_run = registry.build("metric", options, spec=c.spec, data=c.data, path=c.path, objective=c.objective)
    eps = c.objective.config.sampling_eps
    by_hand = registry.build("metric", {**options, "scheduler": "cosine", "prediction": "epsilon", "sampling_eps": eps},
                             spec=c.spec, data=c.data)
    as_velocity = registry.build("metric", options, spec=c.spec, data=c.data)  # what the old default computed
    values = [m.evaluate(run.model, c.data, torch.Generator().manual_seed(3))["bpd"] for m in (in_run, by_hand, as_velocity)]
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert abs(values[0] - values[2]) > 1e-3 * abs(values[1])
    capsys.readouterr()
    for wrong, key in (("{plugin='likelihood', prediction='velocity'}", "prediction"),
                       ("{plugin='likelihood', scheduler='cond_ot'}", "scheduler")):
        assert cli(["eval", str(out), "--steps", "2", "-n", "16", "--repeats", "1", "--no-floor",
                    "--metric", "energy_distance", "--metric", wrong]) == 2
        err = capsys.readouterr().err
        assert key in err and "this run" in err and "Traceback" not in err, err
    assert cli(["eval", str(out), "--steps", "2", "-n", "16", "--repeats", "1", "--no-floor",
                "--metric", "energy_distance", "--metric", "{plugin='likelihood', num_samples=16, method='rk4'}"]) == 0
