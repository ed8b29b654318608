"""The affine path: target = dx_t/dt, and every prediction conversion exact and round-tripping in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.interfaces import PathSample
from core.testing import paths as kit
from core.testing.strategies import batch_sizes, data_shapes, seeds, time_tensors
from plugins.flow_matching.analytic import GaussianFlow
from plugins.flow_matching.path import AffinePath

from .test_flow_schedulers import FIRST_PARTY, schedulers


@pytest.mark.parametrize("mapping", FIRST_PARTY, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_affine_path_passes_the_kit_for_every_scheduler(mapping):
    scheduler = registry.build("scheduler", mapping)
    path = registry.build("path", {"plugin": "affine"}, scheduler=scheduler)
    kit.check_affine_path(path, max_examples=25)


@settings(max_examples=80, deadline=None)
@given(scheduler=schedulers(), shape=data_shapes(), batch=batch_sizes(), seed=seeds(), data=st.data())
def test_conversions_and_target_over_random_schedules(scheduler, shape, batch, seed, data):
    path = AffinePath(scheduler)
    t = data.draw(time_tensors(batch, eps=1e-2))
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    x_1 = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    kit.check_sample_at(path, x_0, x_1, t)
    kit.check_target_is_velocity_at(path, x_0, x_1, t)
    kit.check_conversions_at(path, x_0, x_1, t)


@settings(max_examples=40, deadline=None)
@given(scheduler=schedulers(), dim=st.integers(1, 4), seed=seeds(), data=st.data())
def test_conversions_map_the_marginal_predictions_of_gaussian_data(scheduler, dim, seed, data):
    """Applied to the exact E[x_0 | x_t] and E[x_1 | x_t], the conversions give the exact marginal velocity."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    mean, cov = torch.randn(dim, generator=g, dtype=torch.float64), a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    fields = {p: GaussianFlow(mean, cov, scheduler, p) for p in ("velocity", "epsilon", "x1")}
    t = data.draw(time_tensors(5, eps=0.05))
    x = torch.randn(5, dim, generator=g, dtype=torch.float64)
    path = AffinePath(scheduler)
    for src, source_field in fields.items():
        for dst, target_field in fields.items():
            got = path.convert(source_field(x, t), x, t, src, dst)
            assert torch.allclose(got, target_field(x, t), rtol=1e-7, atol=1e-8), (src, dst)


def test_named_conversions_and_targets():
    path = AffinePath(registry.build("scheduler", {"plugin": "cosine"}))
    g = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    ps = path.sample(x_0, x_1, t)
    assert torch.allclose(path.velocity_to_epsilon(ps.target, ps.x_t, t), x_0)
    assert torch.allclose(path.velocity_to_x1(ps.target, ps.x_t, t), x_1)
    assert torch.allclose(path.epsilon_to_velocity(x_0, ps.x_t, t), ps.target)
    assert torch.allclose(path.x1_to_velocity(x_1, ps.x_t, t), ps.target)
    assert torch.allclose(path.x1_to_epsilon(x_1, ps.x_t, t), x_0)
    assert torch.allclose(path.epsilon_to_x1(x_0, ps.x_t, t), x_1)
    assert path.target(ps, "epsilon") is x_0 and path.target(ps, "x1") is x_1 and path.target(ps) is ps.target
    score = path.velocity_to_score(ps.target, ps.x_t, t)
    sigma = torch.cos(0.5 * torch.pi * t)[:, None]
    assert torch.allclose(score, -x_0 / sigma)
    with pytest.raises(ValueError, match="unknown prediction"):
        path.convert(x_0, ps.x_t, t, "score", "velocity")


class BackwardsTarget(AffinePath):
    def sample(self, x_0, x_1, t):
        ps = super().sample(x_0, x_1, t)
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=ps.x_t, target=-ps.target)

    def __repr__(self):
        return "BackwardsTarget"


class LossyConversion(AffinePath):
    def velocity_to_x1(self, velocity, x_t, t):
        return super().velocity_to_x1(velocity, x_t, t) * (1 + 1e-6)

    def __repr__(self):
        return "LossyConversion"


def test_kit_names_the_violated_invariant():
    from plugins.flow_matching.scheduler import CondOTScheduler

    x_0, x_1 = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    with pytest.raises(AssertionError, match="the target is not d x_t/dt"):
        kit.check_target_is_velocity_at(BackwardsTarget(CondOTScheduler()), x_0, x_1, t)
    with pytest.raises(AssertionError, match="velocity of a path draw to x1"):
        kit.check_conversions_at(LossyConversion(CondOTScheduler()), x_0, x_1, t)
    with pytest.raises(AssertionError, match="an affine path exposes"):
        kit.check_affine_path(object())


@settings(max_examples=40, deadline=None)
@given(shape=data_shapes(), batch=batch_sizes(), seed=seeds(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_cond_ot_path_draws_the_same_bits_as_the_general_affine_formula(shape, batch, seed, dtype):
    """cond_ot's fewer-ops sample equals ``alpha x_1 + sigma x_0`` and ``d alpha x_1 + d sigma x_0`` exactly."""
    from plugins.flow_matching.scheduler import CondOTScheduler

    g = torch.Generator().manual_seed(seed)
    x_0, x_1 = (torch.randn(batch, *shape, generator=g, dtype=dtype) for _ in range(2))
    t = torch.rand(batch, generator=g, dtype=dtype)
    ps = AffinePath(CondOTScheduler()).sample(x_0, x_1, t)
    tb = t.reshape(batch, *([1] * len(shape)))
    ones = torch.ones_like(tb)
    assert torch.equal(ps.x_t, tb * x_1 + (1 - tb) * x_0)
    assert torch.equal(ps.target, ones * x_1 + (-ones) * x_0)
