"""Stochastic interpolants and Schrödinger-bridge CFM (plugins/flow_matching/interpolants.py) against closed forms.

Reference (written here from the papers): for 1D Gaussians ``x_0 ~ N(0, a^2)``, ``x_1 ~ N(0, b^2)`` the
entropic OT plan of ``E|x_1 - x_0|^2 + eps KL(pi | mu x nu)`` is Gaussian with covariance ``c`` solving
``2 c^2 + eps c - 2 a^2 b^2 = 0`` (set the derivative of ``a^2 + b^2 - 2c - eps/2 log(1 - c^2/(a^2 b^2))`` to 0).
The SB marginal ``x_t = t x_1 + (1 - t) x_0 + sigma sqrt(t (1 - t)) z`` has variance
``v(t) = (1-t)^2 a^2 + t^2 b^2 + 2 t (1-t) c + sigma^2 t (1-t)``; a zero-mean Gaussian family whose ODE
velocity is linear, ``u(x) = k x``, satisfies ``v' = 2 k v`` (continuity equation), and its score is ``-x / v``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core import rng
from core.interfaces import DataSpec
from plugins.flow_matching.couplings import couple, sample_rows, sinkhorn_plan, squared_distances
from plugins.flow_matching.interpolants import StochasticInterpolantPath, VelocityScore
from plugins.flow_matching.scheduler import CondOTScheduler


def entropic_cov(a: float, b: float, eps: float) -> float:
    return (-eps + math.sqrt(eps * eps + 16 * a * a * b * b)) / 4


def sb_variance(t: float, a: float, b: float, c: float, sigma: float) -> tuple[float, float]:
    """``(v(t), v'(t))`` of the module docstring."""
    v = (1 - t) ** 2 * a * a + t * t * b * b + 2 * t * (1 - t) * c + sigma * sigma * t * (1 - t)
    dv = -2 * (1 - t) * a * a + 2 * t * b * b + 2 * (1 - 2 * t) * c + sigma * sigma * (1 - 2 * t)
    return v, dv


def sb_path(sigma: float) -> StochasticInterpolantPath:
    return registry.build("path", {"plugin": "schrodinger_bridge", "sigma": sigma})


@settings(max_examples=30, deadline=None)
@given(t=st.floats(0.02, 0.98), kind=st.sampled_from(["brownian", "quadratic"]), a=st.floats(0.1, 3.0))
def test_interpolant_target_is_the_time_derivative_of_the_path(t, kind, a):
    g = torch.Generator().manual_seed(0)
    x_0, x_1, z = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    path = StochasticInterpolantPath(CondOTScheduler(), kind, a)
    h = 1e-6
    at = lambda s: path.sample(x_0, x_1, torch.full((5,), s, dtype=torch.float64), z=z).x_t  # noqa: E731
    fd = (at(t + h) - at(t - h)) / (2 * h)
    ps = path.sample(x_0, x_1, torch.full((5,), t, dtype=torch.float64), z=z)
    assert torch.allclose(ps.target, fd, atol=1e-6)
    gamma = path.gamma(torch.tensor([0.0, 1.0], dtype=torch.float64))[0]
    assert torch.equal(gamma, torch.zeros(2, dtype=torch.float64))


def test_sb_velocity_is_the_brownian_bridge_formula():
    """Tong et al.: u_t = (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x_1 - x_0."""
    g = torch.Generator().manual_seed(1)
    x_0, x_1, z = (torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(6, generator=g, dtype=torch.float64)
    ps = sb_path(0.7).sample(x_0, x_1, t, z=z)
    tt = t[:, None]
    mu = tt * x_1 + (1 - tt) * x_0
    assert torch.allclose(ps.x_t, mu + 0.7 * torch.sqrt(tt * (1 - tt)) * z)
    assert torch.allclose(ps.target, (1 - 2 * tt) / (2 * tt * (1 - tt)) * (ps.x_t - mu) + x_1 - x_0)


def test_sinkhorn_with_eps_two_sigma_squared_gives_the_gaussian_sb_coupling_and_marginals():
    """Sinkhorn's plan between (quantile) samples of the two Gaussians has the closed-form entropic covariance;
    along the SB path with pairs drawn from it the marginal variance is v(t), the regression of the velocity
    target on x_t is v'/(2v) and that of the conditional score -z/gamma is -1/v (the marginal velocity and
    score of the Gaussian bridge)."""
    a, b, sigma, n = 1.0, 2.0, 0.8, 400
    eps = 2 * sigma ** 2
    path = sb_path(sigma)
    assert path.entropic_eps == pytest.approx(eps)
    c = entropic_cov(a, b, eps)
    q = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    x_1, x_0 = b * q, a * q[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    plan = sinkhorn_plan(squared_distances(x_1, x_0), eps, tol=1e-9)
    assert float((plan * (x_1 * x_0.T)).sum()) == pytest.approx(c, abs=0.02)
    assert abs(c - entropic_cov(a, b, 2 * eps)) > 0.2  # the test tells eps from 2 eps
    g = torch.Generator().manual_seed(1)
    xs, us, ss = [], [], []
    for _ in range(25):
        paired = x_0[sample_rows(plan, torch.rand(n, generator=g, dtype=torch.float64))]
        ps = path.sample(paired, x_1, torch.full((n,), 0.3, dtype=torch.float64),
                         z=torch.randn(n, 1, generator=g, dtype=torch.float64))
        xs.append(ps.x_t)
        us.append(ps.target)
        ss.append(-ps.z / ps.gamma[:, None])
    x, u, s = torch.cat(xs), torch.cat(us), torch.cat(ss)
    v, dv = sb_variance(0.3, a, b, c, sigma)
    # E[x^2] = v, E[u x] = k v = v'/2, E[s x] = -1: each within 4 Monte-Carlo standard errors
    for prod, expected in ((x * x, v), (u * x, dv / 2), (s * x, -1.0)):
        se = float(prod.std()) / math.sqrt(prod.numel())
        assert abs(float(prod.mean()) - expected) < 4 * se + 0.01, (float(prod.mean()), expected, se)


def test_objective_uses_two_sigma_squared_and_the_velocity_score_loss():
    path = sb_path(0.5)
    spec = DataSpec(shape=(2,))
    obj = registry.build("objective", {"plugin": "flow_matching", "coupling": "sinkhorn",
                                       "prediction": "velocity_score", "loss_bins": 0}, spec=spec, path=path)
    assert obj.coupling_eps == pytest.approx(0.5)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def model(x, t, y=None):
        return torch.cat([x, t[:, None]], 1) @ w

    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batch = {"x": x, "seeds": rng.shard_seeds(0, 0, 32)}
    loss, _ = obj.loss({"model": model}, batch, 0)
    draw = rng.for_batch(batch)  # the same per-example draws, by hand
    x_0 = couple("sinkhorn", x, draw.randn_like(x, "noise"), u=draw.rand((), "coupling", dtype=torch.float64),
                 eps=0.5)
    t = draw.rand((), "time", dtype=torch.float64)
    z = draw.randn_like(x, "latent")
    tt = t[:, None]
    gamma = 0.5 * torch.sqrt(tt * (1 - tt))
    x_t = tt * x + (1 - tt) * x_0 + gamma * z
    target = x - x_0 + 0.5 * (1 - 2 * tt) / (2 * torch.sqrt(tt * (1 - tt))) * z
    out = model(x_t, t)
    expected = ((out[:, :2] - target) ** 2).mean(1) + ((out[:, 2:] - z) ** 2).mean(1)
    assert float(loss) == pytest.approx(float(expected.mean()), rel=1e-12)
    field = obj.sampling_model(model)
    assert isinstance(field, VelocityScore)
    v, score = field.velocity_and_score(x_t, t)
    assert torch.allclose(v, out[:, :2]) and torch.allclose(score, -out[:, 2:] / gamma)


def test_interpolant_config_errors():
    spec = DataSpec(shape=(2,))
    with pytest.raises(registry.ConfigError, match="interpolant"):
        registry.build("objective", {"plugin": "flow_matching", "prediction": "velocity_score"}, spec=spec,
                       path=registry.build("path", {"plugin": "affine"}, scheduler=CondOTScheduler()))
    with pytest.raises(registry.ConfigError, match="positive"):
        registry.build("path", {"plugin": "schrodinger_bridge", "sigma": 0.0})
    with pytest.raises(registry.ConfigError, match="cond_ot"):
        registry.build("path", {"plugin": "schrodinger_bridge"},
                       scheduler=registry.build("scheduler", {"plugin": "cosine"}))
    obj = registry.build("objective", {"plugin": "flow_matching", "prediction": "velocity_score"}, spec=spec,
                         path=sb_path(0.5))
    with pytest.raises(registry.ConfigError, match="out_channels_mult"):
        obj.loss({"model": lambda x, t, y=None: x}, {"x": torch.randn(4, 2)}, 0)


def test_sb_cfm_experiment_runs_end_to_end(tmp_path):
    """experiments/sb_cfm_2d.toml, shortened: sinkhorn pairs, two heads, the SDE sampler with the learned score."""
    from core.run import run

    from ...conftest import ROOT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run(ROOT / "experiments" / "sb_cfm_2d.toml",
                      ["trainer.steps=2", "trainer.batch_size=256", "trainer.checkpoint_every=0", "trainer.progress='off'",
                       "backbone.hidden=32", "backbone.depth=2", "solver.steps=5", "eval.num_samples=100",
                       "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false"], out=tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    assert math.isfinite(summary["metrics"]["energy_distance"])
