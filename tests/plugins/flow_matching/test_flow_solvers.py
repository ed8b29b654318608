"""The ode solver: fixed-step methods (conformance kit), dopri5 tolerances, time grids, intermediates,
and sampling a model trained under one scheduler along another scheduler's path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.testing import solvers as kit
from core.testing.strategies import data_shapes, seeds
from plugins.flow_matching.analytic import GaussianFlow
from plugins.flow_matching.scheduler import (
    CondOTScheduler,
    CosineScheduler,
    LinearVPScheduler,
    PolynomialConfig,
    PolynomialConvexScheduler,
    VPScheduler,
)
from plugins.flow_matching.solver import (TABLEAUS, ODEConfig, ODESolver, edm_grid, edm_sigmas, integrate_fixed,
                                          rk_step)
from plugins.flow_matching.transforms import ScheduleTransformedModel

from .test_flow_schedulers import schedulers

FIXED = {"euler": (1, 1), "midpoint": (2, 2), "heun": (2, 2), "rk4": (4, 4)}


def ode(**options):
    return registry.build("solver", {"plugin": "ode", **options})


def test_fixed_step_methods_pass_the_kit_on_edm_and_explicit_grids():
    kit.check_solver(lambda m, s: ode(method=m, steps=s), FIXED)
    for method in FIXED:
        kit.check_constant_field(lambda m, s: ode(method=m, steps=s, grid="edm"), method, 7)
        kit.check_constant_field(lambda m, s: ode(method=m, times=[0.0, 0.1, 0.5, 0.55, 1.0]), method, 4)


@pytest.mark.parametrize("method", sorted(FIXED))
def test_tableau_meets_the_butcher_order_conditions(method):
    """Butcher's conditions up to the stated order (rooted trees of order <= 4), in exact fractions."""
    from fractions import Fraction as F

    tab = TABLEAUS[method]
    s = tab.stages
    a = [[F(row[j]) if j < len(row) else F(0) for j in range(s)] for row in tab.a]
    b = [F(w) / F(tab.denominator) for w in tab.weights]
    c = [F(ci) for ci in tab.c]
    assert tab.order == FIXED[method][1] and s == FIXED[method][0]
    assert all(c[i] == sum(a[i]) for i in range(s)), "c_i = sum_j a_ij"
    ac = [sum(a[i][j] * c[j] for j in range(s)) for i in range(s)]
    conditions = {1: [(sum(b), F(1))], 2: [(sum(bi * ci for bi, ci in zip(b, c)), F(1, 2))],
                  3: [(sum(bi * ci ** 2 for bi, ci in zip(b, c)), F(1, 3)), (sum(bi * x for bi, x in zip(b, ac)), F(1, 6))],
                  4: [(sum(bi * ci ** 3 for bi, ci in zip(b, c)), F(1, 4)),
                      (sum(bi * ci * x for bi, ci, x in zip(b, c, ac)), F(1, 8)),
                      (sum(b[i] * sum(a[i][j] * c[j] ** 2 for j in range(s)) for i in range(s)), F(1, 12)),
                      (sum(b[i] * sum(a[i][j] * ac[j] for j in range(s)) for i in range(s)), F(1, 24))]}
    for order, pairs in conditions.items():
        met = all(got == want for got, want in pairs)
        assert met == (order <= tab.order), (method, order, pairs)


@pytest.mark.parametrize("method", sorted(FIXED))
def test_fused_loop_equals_the_textbook_step(method):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def f(x, t, y):
        return torch.tanh(x @ w) * (1 + t[:, None]) + y

    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grid = torch.tensor([0.0, 0.05, 0.3, 0.31, 0.8, 1.0], dtype=torch.float64)
    fast, _ = integrate_fixed(f, x0, grid, method, y)
    x = x0
    for k in range(len(grid) - 1):
        x = rk_step(method, f, x, grid[k].expand(5), grid[k + 1] - grid[k], y)
    assert torch.allclose(fast, x, rtol=1e-13, atol=1e-14)


# -- adaptive ---------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(shape=data_shapes(max_dims=2), seed=seeds(), tol=st.sampled_from([1e-3, 1e-5, 1e-7, 1e-9]),
       omega=st.floats(0.5, 6.0), decay=st.floats(-1.0, 1.0))
def test_dopri5_meets_its_tolerance_on_a_known_solution(shape, seed, tol, omega, decay):
    """dx/dt = (decay + 2 omega t J) x on pairs of coordinates: x(1) = e^decay R(omega) x(0)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, *shape, generator=g, dtype=torch.float64)

    def field(x, t):
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        rot = torch.stack([-x[:, 1], x[:, 0]], dim=1)
        return decay * x + 2 * omega * tt * rot

    solver = ode(method="dopri5", atol=tol, rtol=tol)
    counter = kit.CountingField(field)
    out = solver.sample(counter, x0)
    c, s = math.cos(omega), math.sin(omega)
    exact = math.exp(decay) * torch.stack([c * x0[:, 0] - s * x0[:, 1], s * x0[:, 0] + c * x0[:, 1]], dim=1)
    err = (out.x - exact).abs().max().item()
    assert err <= 20 * (tol + tol * exact.abs().max().item()), err
    assert out.nfe == counter.calls and out.nfe > 0


def test_dopri5_intermediates_are_the_solution_at_the_grid_times():
    x0 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    out = ode(method="dopri5", steps=5, atol=1e-10, rtol=1e-10).sample(lambda x, t, y: -t[:, None] * x, x0,
                                                                        intermediates=True)
    assert out.trajectory.shape == (6, 2, 1) and out.times.shape == (6,)
    exact = x0[None] * torch.exp(-0.5 * out.times ** 2)[:, None, None]
    assert torch.allclose(out.trajectory, exact, atol=1e-8)
    assert torch.equal(out.trajectory[-1], out.x)


def test_dopri_tighter_tolerance_costs_more_and_is_more_accurate():
    x0 = torch.tensor([[1.0]], dtype=torch.float64)
    errs, nfes = [], []
    for tol in (1e-3, 1e-6, 1e-9):
        out = ode(method="dopri5", atol=tol, rtol=tol).sample(lambda x, t, y: torch.cos(8 * t[:, None]) * x, x0)
        errs.append(abs(out.x.item() - math.exp(math.sin(8) / 8)))
        nfes.append(out.nfe)
    assert errs[0] > errs[1] > errs[2] and nfes[0] < nfes[1] < nfes[2]


# -- grids --------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 60), rho=st.floats(1.0, 10.0), scheduler=schedulers())
def test_edm_grid_is_the_rho_schedule_mapped_by_the_scheduler(steps, rho, scheduler):
    grid = edm_grid(steps, scheduler, rho=rho, dtype=torch.float64)
    assert grid.shape == (steps + 1,) and grid[0].item() == 0.0 and grid[-1].item() == 1.0
    assert bool((grid[1:] >= grid[:-1]).all())
    if steps > 1:
        sig = edm_sigmas(steps, rho=rho)
        assert sig[0].item() == pytest.approx(80.0) and sig[-1].item() == pytest.approx(0.002)
        inner = scheduler.snr_inverse(1.0 / sig[1:]).clamp(0, 1)
        assert torch.allclose(grid[1:-1], inner, atol=1e-12)


def test_edm_grid_of_cond_ot_and_the_solver_option():
    grid = ode(method="euler", steps=4, grid="edm").time_grid(dtype=torch.float64)
    sig = edm_sigmas(4)
    assert torch.allclose(grid[1:-1], 1 / (1 + sig[1:]), atol=1e-12)
    assert ode(method="euler", steps=4, grid="edm", sigma_max=10.0).time_grid(dtype=torch.float64)[1] > grid[1]


def test_explicit_and_reversed_grids_invert_the_flow():
    """Integrating 0 -> 1 then 1 -> 0 on the same grid returns to the start (rk4, smooth field)."""
    times = [0.0, 0.1, 0.15, 0.4, 0.7, 0.95, 1.0]
    g = torch.Generator().manual_seed(3)
    w = 0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    field = kit.CountingField(lambda x, t: torch.sin(x @ w) + t[:, None])
    x0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    fwd = ode(method="rk4", times=times).sample(field, x0)
    assert fwd.nfe == 24
    fine_times = torch.linspace(0, 1, 401, dtype=torch.float64).tolist()
    x1 = ode(method="rk4", times=fine_times).sample(field, x0).x
    back = ode(method="rk4", times=fine_times[::-1]).sample(field, x1).x
    assert torch.allclose(back, x0, atol=1e-10)
    reverse = ode(method="euler", t0=1.0, t1=0.0, steps=3).time_grid(dtype=torch.float64)
    assert reverse.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])


def test_grid_options_are_validated():
    with pytest.raises(registry.ConfigError, match="strictly increasing"):
        ode(times=[0.0, 0.5, 0.5, 1.0])
    with pytest.raises(registry.ConfigError, match="sigma_min"):
        ode(grid="edm", sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(registry.ConfigError, match="unknown scheduler plugin 'cosin'"):
        registry.build("solver", {"plugin": "ode", "sampling_scheduler": "cosin"}, scheduler=CondOTScheduler())
    with pytest.raises(registry.ConfigError, match="sampling_scheduler needs"):
        ode(sampling_scheduler="cosine")


# -- sampling under another scheduler ----------------------------------------------------------
def _gaussian(dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.randn(dim, generator=g, dtype=torch.float64), a @ a.T / dim + 0.05 * torch.eye(dim, dtype=torch.float64)


@settings(max_examples=20, deadline=None)
@given(original=schedulers(), new=schedulers(), dim=st.integers(1, 3), seed=seeds(),
       r0=st.floats(0.05, 0.45), r1=st.floats(0.55, 0.97))
def test_schedule_transformed_trajectories_are_rescaled_original_ones(original, new, dim, seed, r0, r1):
    """For any two schedulers: integrating the transformed field over [r0, r1] from s_r0 x equals
    s_r1 times the original flow over [t(r0), t(r1)] (float64, tight tolerances)."""
    mean, cov = _gaussian(dim, seed)
    model = GaussianFlow(mean, cov, original)
    transformed = ScheduleTransformedModel(model, original, new)
    r = torch.tensor([r0, r1], dtype=torch.float64)
    t, s, _, _ = transformed.time_and_scale(r)
    x = torch.randn(4, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    direct = ode(method="dopri5", times=[t[0].item(), t[1].item()], atol=1e-9, rtol=1e-9).sample(model, x).x
    moved = ode(method="dopri5", times=[r0, r1], atol=1e-9, rtol=1e-9).sample(transformed, s[0] * x).x
    assert torch.allclose(moved, s[1] * direct, rtol=1e-6, atol=1e-7)


REGULAR = [CondOTScheduler(), CosineScheduler(), PolynomialConvexScheduler(PolynomialConfig(n=1.0))]


@settings(max_examples=12, deadline=None)
@given(original=st.sampled_from(REGULAR),
       new=st.one_of(st.sampled_from(REGULAR),
                     st.floats(1.0, 3.0).map(lambda n: PolynomialConvexScheduler(PolynomialConfig(n=n)))),
       dim=st.integers(1, 3), seed=seeds())
def test_model_trained_with_one_scheduler_sampled_under_another_gives_the_same_samples(original, new, dim, seed):
    """End to end through the solver plugin's sampling_scheduler option, from t=0 to t=1."""
    mean, cov = _gaussian(dim, seed)
    model = GaussianFlow(mean, cov, original)
    x0 = torch.randn(8, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # Both solves carry a global error of ~100x their local tolerance (4e-7 at 1e-9 for cond_ot -> n=1.25):
    # solve at 1e-11 so that the comparison below tests the transformation, not the tolerance.
    direct = ODESolver(ODEConfig(method="dopri5", atol=1e-11, rtol=1e-11)).sample(model, x0).x
    name = {"CondOTScheduler": {"plugin": "cond_ot"}, "CosineScheduler": {"plugin": "cosine"}}.get(
        type(new).__name__, {"plugin": "polynomial", "n": getattr(new, "n", 1.0)})
    solver = registry.build("solver", {"plugin": "ode", "method": "dopri5", "atol": 1e-11, "rtol": 1e-11,
                                       "sampling_scheduler": name}, scheduler=original)
    resampled = solver.sample(model, x0).x
    assert torch.allclose(resampled, direct, rtol=1e-6, atol=1e-7)


def test_sampling_under_another_scheduler_changes_the_path_not_the_endpoint():
    mean, cov = _gaussian(2, 0)
    model = GaussianFlow(mean, cov, CondOTScheduler())
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = ode(method="rk4", steps=200, t1=1.0).sample(model, x0, intermediates=True)
    solver = registry.build("solver", {"plugin": "ode", "method": "rk4", "steps": 200, "sampling_scheduler": "cosine"},
                            scheduler=CondOTScheduler())
    b = solver.sample(model, x0, intermediates=True)
    assert torch.allclose(a.x, b.x, atol=1e-8)
    assert (a.trajectory[100] - b.trajectory[100]).abs().max() > 1e-2
    transform = solver.field(model)
    assert isinstance(transform, ScheduleTransformedModel)
    # the field is finite at both ends for this pair
    for r in (0.0, 1.0):
        v = transform(x0, torch.full((16,), r, dtype=torch.float64))
        assert torch.isfinite(v).all()


def test_vp_and_linear_vp_are_accepted_as_sampling_schedulers():
    mean, cov = _gaussian(2, 0)
    model = GaussianFlow(mean, cov, CondOTScheduler())
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for new in (VPScheduler(), LinearVPScheduler()):
        out = ODESolver(ODEConfig(method="midpoint", steps=50)).sample(
            ScheduleTransformedModel(model, CondOTScheduler(), new), x0)
        assert torch.isfinite(out.x).all()
