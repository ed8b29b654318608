"""benchmarks/diffusion_nfe.py: its exact Gaussian solution, and flowforge's solvers against diffusers' schedulers
on identical inputs in float64 (the same final error to 1e-9 relative, every solver but UniPC bh1, whose diffusers
version returns NaN at the final zero sigma)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ..conftest import ROOT

pytest.importorskip("diffusers")
sys.path.insert(0, str(ROOT / "benchmarks"))
import diffusion_nfe as bench  # noqa: E402

SIGMAS = np.sqrt(1 / np.cumprod(1 - np.linspace(1e-4, 0.02, bench.T)) - 1)


def test_the_closed_form_solves_the_probability_flow_ode():
    """d xbar / d s = eps(x, s) = (xbar - x0_hat) / s along the exact solution, by finite differences."""
    model = bench.Gaussian(SIGMAS)
    x = torch.randn(8, bench.D, dtype=torch.float64)
    s0, s1, h = 30.0, 2.0, 1e-5

    def xbar(s):  # the solution from (x, s0) evaluated at s, via the closed form with s as the end point
        return model.mu + (x * (1 + s0 ** 2) ** 0.5 - model.mu) * ((model.c ** 2 + s ** 2) / (model.c ** 2 + s0 ** 2)) ** 0.5

    derivative = (xbar(s1 + h) - xbar(s1 - h)) / (2 * h)
    eps = model.eps_at(xbar(s1) / (1 + s1 ** 2) ** 0.5, s1)
    torch.testing.assert_close(derivative, eps, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(model.exact(x, s0), xbar(0.0))


@pytest.mark.parametrize("entry", [e for e in bench.SOLVERS if e[0] != "UniPC bh1" and e[2]], ids=lambda e: e[0])
def test_flowforge_and_diffusers_reach_the_same_sample(entry):
    label, (plugin, ff_opts), (cls, d_opts), to_steps = entry
    model = bench.Gaussian(SIGMAS)
    x = torch.randn(16, bench.D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    steps = to_steps(10) if to_steps else 10
    ours, nfe = bench.flowforge(model, x, plugin, steps, **ff_opts)
    theirs, their_nfe = bench.diffusers_run(model, x, cls, steps, **d_opts)
    assert nfe == their_nfe and ours == pytest.approx(theirs, rel=1e-9), (label, ours, theirs)


def test_digits_benchmark_spends_the_budgets_it_reports():
    """benchmarks/diffusion_digits_nfe.py: every solver setting spends the NFE of its column (Heun: 2 n - 1 for
    n steps, reported in parentheses), on the digits' 1000-step cosine process."""
    import registry
    from core.interfaces import DataSpec

    import diffusion_digits_nfe as digits

    path = registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": 1000,
                                   "prediction": "v", "variance": "learned_range"}, spec=DataSpec((1, 8, 8)))
    calls = []

    def field(x, t, y=None):
        calls.append(1)
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    for label, plugin, fixed, budget in digits.SOLVERS:
        for nfe in digits.NFES:
            solver = registry.build("solver", {"plugin": plugin, "clip_denoised": True, **fixed, **budget(nfe)},
                                    path=path)
            calls.clear()
            out = solver.sample(field, torch.randn(2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
            expected = 2 * ((nfe + 1) // 2) - 1 if plugin == "heun" else nfe
            assert out.nfe == len(calls) == expected, (label, nfe, out.nfe, len(calls))
