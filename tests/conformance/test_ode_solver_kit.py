"""The first-party fixed-step ODE solver passes the solver conformance kit, and the kit catches violations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.interfaces import SolverResult
from core.testing import solvers as kit

METHODS = {"euler": (1, 1), "midpoint": (2, 2), "heun": (2, 2), "rk4": (4, 4)}


def make(method: str, steps: int):
    return registry.build("solver", {"plugin": "ode", "method": method, "steps": steps})


def test_ode_solver_passes_the_kit():
    kit.check_solver(make, METHODS)


@settings(max_examples=25, deadline=None)
@given(method=st.sampled_from(sorted(METHODS)), steps=st.integers(1, 40), a=st.floats(-2.0, 2.0))
def test_linear_field_error_is_within_the_method_bound(method, steps, a):
    """On dx/dt = a x the one-step growth factor is the Taylor polynomial of e^{ah} to the method's order."""
    x0 = torch.tensor([[1.0]], dtype=torch.float64)
    out = make(method, steps).sample(kit.CountingField(lambda x, t: a * x), x0)
    h = 1.0 / steps
    z = a * h
    taylor = {"euler": 1 + z, "midpoint": 1 + z + z**2 / 2, "heun": 1 + z + z**2 / 2,
              "rk4": 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24}[method]
    assert out.x.item() == pytest.approx(taylor**steps, rel=1e-12)


class MiscountingEuler:
    def __init__(self, steps):
        self.steps = steps

    def sample(self, model, x, *, y=None, generator=None, intermediates=False):
        for k in range(self.steps):
            x = x + model(x, torch.full((x.shape[0],), k / self.steps, dtype=x.dtype), y) / self.steps
        return SolverResult(x=x, nfe=self.steps + 1)


def test_kit_names_the_violated_invariant():
    with pytest.raises(AssertionError, match="reported nfe 4, expected steps x stages = 3 x 1"):
        kit.check_nfe(lambda m, s: MiscountingEuler(s), "euler", 3, 1)
    with pytest.raises(AssertionError, match="error ratio on doubling the steps"):
        kit.check_order(lambda m, s: MiscountingEuler(s), "euler", 2)
