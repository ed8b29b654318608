"""SDE samplers for flows (plugins/flow_matching/sde.py): Gaussian data with the exact fields.

Reference fields, written here: data ``x_1 ~ N(m, S)``, source ``x_0 ~ N(0, I)``, the straight path
``x_t = t x_1 + (1 - t) x_0 (+ gamma_t z)``. Everything is jointly Gaussian, so with
``C_t = Cov(x_t) = t^2 S + ((1 - t)^2 + gamma_t^2) I`` the marginal velocity is
``E[x_1 - x_0 + gamma' z | x_t] = m + (t S - (1 - t) I + gamma gamma' I) C_t^{-1} (x - t m)`` and
``E[z | x_t] = gamma C_t^{-1} (x - t m)``.
"""

from __future__ import annotations

import pytest
import torch

import registry
from plugins.flow_matching.interpolants import StochasticInterpolantPath, VelocityScore
from plugins.flow_matching.scheduler import CondOTScheduler
from plugins.flow_matching.sde import SDEConfig, SDESolver
from plugins.flow_matching.solver import ODEConfig, ODESolver

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)


class GaussianFields(torch.nn.Module):
    """The exact velocity (with ``heads``: ``[velocity, E[z | x_t]]``) of the module docstring.

    Solvers call it with one time for the whole batch (``t`` expanded to ``(B,)``), so one solve per call.
    """

    def __init__(self, path: StochasticInterpolantPath | None = None, heads: bool = False):
        super().__init__()
        self.path, self.heads = path, heads

    def forward(self, x, t, y=None):
        assert torch.all(t == t[0])
        ti = float(t[0])
        g, dg = (0.0, 0.0) if self.path is None else (float(v) for v in self.path.gamma(torch.tensor(ti)))
        c = ti * ti * COV + ((1 - ti) ** 2 + g * g) * EYE
        r = torch.linalg.solve(c, (x - ti * MEAN).T).T
        v = MEAN + r @ (ti * COV - (1 - ti) * EYE + g * dg * EYE).T
        return torch.cat([v, g * r], 1) if self.heads else v


def BatchedGaussianVelocity():  # noqa: N802 - the velocity alone
    return GaussianFields()


def affine_path():
    return registry.build("path", {"plugin": "affine"}, scheduler=CondOTScheduler())


def test_reference_velocity_is_the_conditional_mean():
    """Monte Carlo: regressing x_1 - x_0 on x_t at t = 0.4 recovers the reference velocity's affine map."""
    g = torch.Generator().manual_seed(9)
    n, t = 200000, 0.4
    x_1 = MEAN + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).T
    x_0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_t, u = t * x_1 + (1 - t) * x_0, x_1 - x_0
    design = torch.cat([x_t, torch.ones(n, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, u).solution
    probe = torch.randn(8, 2, generator=g, dtype=torch.float64)
    fitted = torch.cat([probe, torch.ones(8, 1, dtype=torch.float64)], 1) @ coef
    assert torch.allclose(fitted, GaussianFields()(probe, torch.full((8,), t, dtype=torch.float64)), atol=0.02)


def assert_matches_data(x: torch.Tensor, slack: float = 0.0):
    """Mean and covariance of ``x (n, 2)`` within 4 Monte-Carlo standard errors (+ `slack` for discretisation)."""
    n = x.shape[0]
    mean_se = torch.sqrt(torch.diagonal(COV) / n)
    assert ((x.mean(0) - MEAN).abs() < 4 * mean_se + slack).all(), x.mean(0)
    d = torch.diagonal(COV)
    cov_se = torch.sqrt((COV ** 2 + d[:, None] * d[None, :]) / n)  # Var of a sample covariance entry
    assert ((torch.cov(x.T) - COV).abs() < 4 * cov_se + slack).all(), torch.cov(x.T)


@pytest.mark.parametrize("method,diffusion,t0,last", [
    ("euler", "constant", 0.0, "euler"), ("euler", "sigma", 0.0, "mean"), ("euler", "SBDM", 1e-3, "mean"),
    ("euler", "linear", 0.0, "tweedie"), ("heun", "decreasing", 0.0, "mean"),
    ("heun", "increasing_decreasing", 0.0, "mean"), ("heun", "SBDM", 1e-3, "mean"),
])
def test_sde_samples_the_gaussian_data(method, diffusion, t0, last):
    """Mean and covariance of 20000 samples match the data's (the last step: a noiseless "mean" step
    contracts by about h w(t_N) / S, so a constant diffusion ends with an euler step)."""
    solver = registry.build("solver", {"plugin": "sde", "method": method, "diffusion": diffusion, "t0": t0,
                                       "steps": 100, "last_step": last}, path=affine_path())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(12000, 2, generator=g, dtype=torch.float64)
    out = solver.sample(BatchedGaussianVelocity(), x0, generator=g)
    assert out.nfe == 100 * (2 if method == "heun" else 1) + 1
    assert_matches_data(out.x, slack=0.01)


def test_sde_with_stochasticity_differs_from_the_ode_but_not_in_law():
    solver = SDESolver(SDEConfig(steps=50, diffusion="constant", norm=1.0), affine_path())
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ode = ODESolver(ODEConfig(method="euler", times=solver.time_grid().tolist())).sample(BatchedGaussianVelocity(), x0)
    sde = solver.sample(BatchedGaussianVelocity(), x0, generator=torch.Generator().manual_seed(2))
    assert (sde.x - ode.x).abs().mean() > 0.05


@pytest.mark.parametrize("last_step", ["euler", "mean"])
def test_zero_diffusion_euler_maruyama_is_the_euler_ode(last_step):
    solver = SDESolver(SDEConfig(steps=30, norm=0.0, diffusion="constant", last_step=last_step, t0=0.01),
                       affine_path())
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ode = ODESolver(ODEConfig(method="euler", times=solver.time_grid().tolist()))
    got = solver.sample(BatchedGaussianVelocity(), x0, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(got.x, ode.sample(BatchedGaussianVelocity(), x0).x, rtol=0, atol=1e-12)


def test_zero_diffusion_stochastic_heun_is_the_heun_ode():
    solver = SDESolver(SDEConfig(method="heun", steps=20, norm=0.0, last_step="none"), affine_path())
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ode = ODESolver(ODEConfig(method="heun", steps=20)).sample(BatchedGaussianVelocity(), x0)
    got = solver.sample(BatchedGaussianVelocity(), x0, generator=torch.Generator().manual_seed(6))
    assert got.nfe == ode.nfe == 40
    assert torch.allclose(got.x, ode.x, rtol=0, atol=1e-12)


def test_tweedie_last_step_is_the_posterior_mean():
    """From t = 1 - h with zero diffusion the tweedie step returns E[x_1 | x_t] = m + t S C_t^{-1} (x - t m)."""
    solver = SDESolver(SDEConfig(steps=1, norm=0.0, last_step="tweedie", last_step_size=0.1, t0=0.5), affine_path())
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = solver.sample(BatchedGaussianVelocity(), x0, intermediates=True)
    x_t, t = out.trajectory[-2], 0.9
    c = t * t * COV + (1 - t) ** 2 * EYE
    expected = MEAN + (t * COV @ torch.linalg.solve(c, (x_t - t * MEAN).T)).T
    assert torch.allclose(out.x, expected, atol=1e-12)


def test_interpolant_sde_with_the_learned_score_heads_samples_the_data():
    """The stochastic interpolant's forward SDE with w = constant, using the model's own E[z | x_t] head."""
    path = StochasticInterpolantPath(CondOTScheduler(), "brownian", 0.5)
    field = VelocityScore(GaussianFields(path, heads=True), path)
    solver = registry.build("solver", {"plugin": "sde", "diffusion": "constant", "norm": 0.5, "steps": 60,
                                       "t0": 1e-3}, path=path)
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    assert_matches_data(solver.sample(field, x0, generator=g).x, slack=0.02)


def test_sde_config_errors():
    with pytest.raises(registry.ConfigError, match="t0 > 0"):
        SDEConfig(diffusion="SBDM")
    with pytest.raises(registry.ConfigError, match="singular"):
        SDEConfig(diffusion="constant", last_step="none")
    SDEConfig(diffusion="linear", last_step="none")
    path = StochasticInterpolantPath(CondOTScheduler())
    with pytest.raises(registry.ConfigError, match="affine"):
        registry.build("solver", {"plugin": "sde", "diffusion": "sigma"}, path=path)
    with pytest.raises(registry.ConfigError, match="velocity_score"):
        registry.build("solver", {"plugin": "sde", "diffusion": "constant"}, path=path).sample(
            BatchedGaussianVelocity(), torch.randn(4, 2, dtype=torch.float64))
