"""Schedulers of plugins/flow_matching: the conformance kit over every first-party scheduler and random parameters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.interfaces import ConvexScheduler, Scheduler, SchedulerOutput
from core.testing import schedulers as kit
from plugins.flow_matching.scheduler import (
    CondOTScheduler,
    CosineScheduler,
    LinearVPScheduler,
    PolynomialConfig,
    PolynomialConvexScheduler,
    VPConfig,
    VPScheduler,
)

FIRST_PARTY = [
    {"plugin": "cond_ot"},
    {"plugin": "polynomial"},
    {"plugin": "polynomial", "n": 3.5},
    {"plugin": "cosine"},
    {"plugin": "vp"},
    {"plugin": "vp", "beta_min": 0.5, "beta_max": 5.0},
    {"plugin": "linear_vp"},
]


def schedulers() -> st.SearchStrategy[Scheduler]:
    """Every first-party scheduler, with random parameters where it has some."""
    return st.one_of(
        st.just(CondOTScheduler()),
        st.just(CosineScheduler()),
        st.just(LinearVPScheduler()),
        st.floats(0.5, 5.0).map(lambda n: PolynomialConvexScheduler(PolynomialConfig(n=n))),
        st.tuples(st.floats(0.0, 2.0), st.floats(0.1, 30.0)).map(
            lambda p: VPScheduler(VPConfig(beta_min=p[0], beta_max=p[0] + p[1]))),
    )


def test_first_party_schedulers_are_registered():
    assert {"cond_ot", "polynomial", "cosine", "vp", "linear_vp"} <= set(registry.available("scheduler"))


@pytest.mark.parametrize("mapping", FIRST_PARTY, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_every_first_party_scheduler_passes_the_kit(mapping):
    kit.check_scheduler(registry.build("scheduler", mapping), max_examples=40)


@settings(max_examples=80, deadline=None)
@given(scheduler=schedulers(), t=kit.times(max_batch=6))
def test_random_schedules_derivatives_round_trips(scheduler, t):
    kit.check_derivatives(scheduler, t)
    kit.check_snr_inverse(scheduler, t)
    if isinstance(scheduler, ConvexScheduler):
        kit.check_kappa(scheduler, t)


@settings(max_examples=40, deadline=None)
@given(scheduler=schedulers())
def test_random_schedules_boundaries(scheduler):
    kit.check_boundaries(scheduler, scheduler.boundaries)
    kit.check_snr_inverse_ends(scheduler, scheduler.boundaries)


def test_documented_boundaries():
    for s in (CondOTScheduler(), PolynomialConvexScheduler(), CosineScheduler(), LinearVPScheduler()):
        kit.check_boundaries(s, (0.0, 1.0, 1.0, 0.0))
    vp = VPScheduler(VPConfig(beta_min=0.1, beta_max=20.0))
    a0 = math.exp(-(0.1 + 20.0) / 4)
    kit.check_boundaries(vp, (a0, math.sqrt(1 - a0 ** 2), 1.0, 0.0))
    assert 0.006 < a0 < 0.007


@pytest.mark.parametrize("scheduler", [CondOTScheduler(), PolynomialConvexScheduler(), CosineScheduler(),
                                       VPScheduler(), LinearVPScheduler()], ids=repr)
def test_dtype_and_shape_follow_t(scheduler):
    t = torch.rand(3, 4, dtype=torch.float32) * 0.98 + 0.01
    out = kit.check_output(scheduler, t)
    assert out.alpha_t.dtype == torch.float32
    assert scheduler.snr_inverse(out.alpha_t / out.sigma_t).shape == t.shape


def test_closed_forms_at_a_point():
    t = torch.tensor([0.3], dtype=torch.float64)
    c = CosineScheduler()(t)
    assert c.alpha_t.item() == pytest.approx(math.sin(0.15 * math.pi), abs=1e-15)
    assert c.d_sigma_t.item() == pytest.approx(-0.5 * math.pi * math.sin(0.15 * math.pi), abs=1e-15)
    p = PolynomialConvexScheduler(PolynomialConfig(n=3.0))(t)
    assert p.alpha_t.item() == pytest.approx(0.027, abs=1e-15)
    assert p.d_alpha_t.item() == pytest.approx(3 * 0.09, abs=1e-15)
    lv = LinearVPScheduler()(t)
    assert lv.sigma_t.item() == pytest.approx(math.sqrt(0.91), abs=1e-15)


def test_polynomial_config_is_validated():
    with pytest.raises(registry.ConfigError, match="positive exponent"):
        registry.build("scheduler", {"plugin": "polynomial", "n": 0.0})
    with pytest.raises(registry.ConfigError, match="beta_max"):
        registry.build("scheduler", {"plugin": "vp", "beta_min": 2.0, "beta_max": 1.0})


# -- the kit catches violations --------------------------------------------------------------
class WrongDerivative(CondOTScheduler):
    def __call__(self, t):
        out = super().__call__(t)
        return SchedulerOutput(out.alpha_t, out.sigma_t, 1.01 * out.d_alpha_t, out.d_sigma_t)

    def __repr__(self):
        return "WrongDerivative()"


class WrongInverse(CosineScheduler):
    def snr_inverse(self, snr):
        return torch.atan(snr) / math.pi

    def __repr__(self):
        return "WrongInverse()"


class NotConvex(ConvexScheduler):
    def __call__(self, t):
        return SchedulerOutput(t, 1 - t * t, torch.ones_like(t), -2 * t)

    def snr_inverse(self, snr):
        return (torch.sqrt(1 + 4 * snr * snr) - 1) / (2 * snr)

    def kappa_inverse(self, kappa):
        return kappa


def test_kit_names_the_violated_invariant():
    with pytest.raises(AssertionError, match="d_alpha_t does not match autograd"):
        kit.check_scheduler(WrongDerivative(), max_examples=5)
    with pytest.raises(AssertionError, match="snr_inverse"):
        kit.check_scheduler(WrongInverse(), max_examples=5)
    with pytest.raises(AssertionError, match="sigma_t = 1 - alpha_t"):
        kit.check_kappa(NotConvex(), torch.tensor([0.3, 0.6], dtype=torch.float64))
    with pytest.raises(AssertionError, match="alpha_0 = 0.0065"):
        kit.check_boundaries(VPScheduler())
