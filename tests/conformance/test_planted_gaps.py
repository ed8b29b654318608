"""Tests that close three gaps found by planting one-line bugs (issue 22, point 7).

* The x1-prediction clamp at t = 1 must be exercised with a scheduler whose sigma(1) is exactly 0
  (cond_ot; the cosine scheduler's sigma(1) = 6e-17 hides a missing clamp).
* The discrete divergence-free field's coefficient is kappa' / (kappa (1 - kappa)) (its 1/kappa matters).
* The discrete solver evaluates beta at t_k, the time of the velocity it adds to, not at t_{k+1}.

The discrete references are written here from the formulas of Gat et al. (2024) and the CTMC Euler
step (stay with probability exp(-h lambda), else jump in proportion to the rates), not from flowforge.
"""

from __future__ import annotations

import math

import pytest
import torch

import registry
from core.interfaces import DataSpec
from plugins.discrete_flow.path import MixtureDiscretePath
from plugins.discrete_flow.solver import DiscreteEulerConfig, DiscreteEulerSolver
from plugins.flow_matching.analytic import GaussianFlow
from plugins.flow_matching.scheduler import CondOTScheduler


# --------------------------------------------------------------------------- x1 clamp at t = 1
def test_x1_prediction_is_evaluated_below_t_equal_one_where_sigma_is_exactly_zero():
    scheduler = CondOTScheduler()
    assert float(scheduler(torch.ones(1, dtype=torch.float64)).sigma_t) == 0.0
    eps = 1e-3
    obj = registry.build("objective", {"plugin": "flow_matching", "prediction": "x1", "sampling_eps": eps},
                         spec=DataSpec(shape=(2,)),
                         path=registry.build("path", {"plugin": "affine"}, scheduler=scheduler))
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    field = obj.sampling_model(GaussianFlow(mean, cov, scheduler, "x1"))
    truth = GaussianFlow(mean, cov, scheduler, "velocity")
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = field(x, torch.ones(5, dtype=torch.float64))
    assert torch.isfinite(out).all()
    # the value is the true velocity at 1 - eps (the clamp), not a limit taken some other way
    assert torch.allclose(out, truth(x, torch.full((5,), 1 - eps, dtype=torch.float64)), atol=1e-9)


# --------------------------------------------------------------------------- discrete references
def make_path(vocab: int, n: float = 2.0) -> MixtureDiscretePath:
    return MixtureDiscretePath(registry.build("scheduler", {"plugin": "polynomial", "n": n}), vocab, "uniform")


def reference_rates(q: torch.Tensor, z: int, t: float, beta: float, n: float) -> torch.Tensor:
    """Off-diagonal jump rates ``(V,)`` from state z at time t, kappa = t^n, constant posterior q."""
    vocab = q.shape[0]
    kappa, d_kappa = t**n, n * t ** (n - 1)
    p0 = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    delta = torch.zeros(vocab, dtype=torch.float64)
    delta[z] = 1.0
    u = d_kappa / (1 - kappa) * (q - delta)
    v = d_kappa / (kappa * (1 - kappa)) * ((1 - kappa) * p0 + kappa * q - delta)
    rates = (u + beta * v).clamp_min(0.0)
    rates[z] = 0.0
    return rates


def reference_kernel(q: torch.Tensor, t: float, h: float, beta: float, n: float) -> torch.Tensor:
    """``K[z, x]``: the probability that one Euler step of size h from (z, t) lands on x."""
    rows = []
    for z in range(q.shape[0]):
        r = reference_rates(q, z, t, beta, n)
        lam = float(r.sum())
        row = (1 - math.exp(-h * lam)) * r / lam
        row[z] = math.exp(-h * lam)
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("t", [0.1, 0.35, 0.7, 0.9])
def test_divergence_free_field_matches_its_formula(t):
    vocab, n = 5, 2.0
    path = make_path(vocab, n)
    q = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5], dtype=torch.float64), 0)
    z = torch.arange(vocab)
    times = torch.full((vocab,), t, dtype=torch.float64)
    kappa, d_kappa = t**n, n * t ** (n - 1)
    p0 = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    expected = d_kappa / (kappa * (1 - kappa)) * ((1 - kappa) * p0 + kappa * q - torch.eye(vocab, dtype=torch.float64))
    got = path.divergence_free(q.expand(vocab, vocab), z, times)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


class ConstantPosterior(torch.nn.Module):
    """Logits ``log q`` at every position, whatever the state and time: ``(B, N) -> (B, N, V)``."""

    def __init__(self, q: torch.Tensor):
        super().__init__()
        self.log_q = q.log()

    def forward(self, x, t, y=None):
        return self.log_q.to(torch.float64).expand(*x.shape, -1)


@pytest.mark.parametrize("div_free", ["sym", 3.0])
def test_one_euler_step_has_the_reference_transition_law(div_free):
    """One step from t_0 = 0.3 to t_1 = 0.55 (an explicit grid) with the divergence-free term: the empirical
    transition frequencies of 80000 positions match the kernel built from the rates at t_0 (beta(t_0))."""
    vocab, n, t0, t1 = 4, 2.0, 0.3, 0.55
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    config = DiscreteEulerConfig(times=[t0, t1, 1.0], div_free=div_free, categorical_dtype="float64")
    solver = DiscreteEulerSolver(config, make_path(vocab, n))
    g = torch.Generator().manual_seed(0)
    x_init = torch.randint(vocab, (1, 80000), generator=g)
    out = solver.sample(ConstantPosterior(q), x_init, generator=g, intermediates=True)
    assert out.nfe == 2
    after = out.trajectory[1]
    beta = config.beta()(t0)
    kernel = reference_kernel(q, t0, t1 - t0, beta, n)
    empirical = torch.stack([torch.bincount(after[x_init == z], minlength=vocab).double() / (x_init == z).sum()
                             for z in range(vocab)])
    assert (empirical - kernel).abs().max() < 0.015
    # the two planted bugs would move the kernel by far more than the sampling error
    wrong_time = reference_kernel(q, t0, t1 - t0, config.beta()(t1), n)
    assert (wrong_time - kernel).abs().max() > 0.05 or div_free != "sym"


def test_the_solver_passes_beta_at_the_start_of_each_step():
    vocab = 3
    config = DiscreteEulerConfig(times=[0.0, 0.2, 0.5, 0.9, 1.0], div_free="sym")
    solver = DiscreteEulerSolver(config, make_path(vocab, 1.0))
    seen = []
    rates = solver.jump_rates

    def spy(posterior, x_t, t, beta=0.0):
        seen.append((float(t[0]), beta))
        return rates(posterior, x_t, t, beta)

    solver.jump_rates = spy
    q = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    solver.sample(ConstantPosterior(q), torch.zeros(2, 7, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    beta = config.beta()
    assert [s[0] for s in seen] == pytest.approx([0.0, 0.2, 0.5])
    assert [s[1] for s in seen] == pytest.approx([beta(0.0), beta(0.2), beta(0.5)])


def test_discrete_time_grid_config_errors():
    with pytest.raises(registry.ConfigError, match="times"):
        registry.resolved("solver", {"plugin": "discrete_euler", "times": [0.0, 0.5, 0.4]})
    with pytest.raises(registry.ConfigError, match="times"):
        registry.resolved("solver", {"plugin": "discrete_euler", "times": [0.0, 1.5]})
