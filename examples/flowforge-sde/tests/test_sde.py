"""Tests of flowforge-sde: registration, the score formula, marginals, the conformance kit, the experiment file.

Run with ``pytest examples/flowforge-sde`` once the package is installed
(``pip install -e examples/flowforge-sde``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.interfaces import Scheduler, SchedulerOutput
from core.testing import solvers as solver_kit
from core.testing.strategies import times

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "sde_2d.toml"


class Cosine(Scheduler):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2): a non-linear schedule defined here, not flowforge's."""

    def __call__(self, t):
        h = math.pi / 2
        return SchedulerOutput(torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t))

    def snr_inverse(self, snr):
        return torch.atan(snr) / (math.pi / 2)


def schedulers() -> dict[str, Scheduler]:
    """Every installed scheduler that builds with its defaults, plus the local cosine one."""
    out: dict[str, Scheduler] = {"local_cosine": Cosine()}
    for name in registry.available("scheduler"):
        try:
            out[name] = registry.build("scheduler", {"plugin": name})
        except (registry.ConfigError, TypeError):
            continue
    return out


SCHEDULERS = schedulers()


def sde(scheduler=None, **options):
    if scheduler is None:
        scheduler = registry.build("scheduler", {"plugin": "cond_ot"})
    return registry.build("solver", {"plugin": "euler_maruyama", **options}, scheduler=scheduler)


class GaussianVelocity:
    """The exact marginal velocity for data ``x_1 ~ N(m, diag(v))`` under ``scheduler``.

    ``p_t = N(alpha m, alpha^2 v + sigma^2)`` and
    ``u(x, t) = d_alpha m + (alpha d_alpha v + sigma d_sigma) / (alpha^2 v + sigma^2) (x - alpha m)``.
    """

    def __init__(self, scheduler, m, v):
        self.scheduler, self.m, self.v = scheduler, m, v
        self.calls = 0

    def coefficients(self, t, ndim):
        c = self.scheduler(t)
        shape = (-1,) + (1,) * (ndim - 1)
        return tuple(v.reshape(shape) for v in (c.alpha_t, c.sigma_t, c.d_alpha_t, c.d_sigma_t))

    def __call__(self, x, t, y=None):
        self.calls += 1
        a, s, da, ds = self.coefficients(t, x.ndim)
        var = a * a * self.v + s * s
        return da * self.m + (a * da * self.v + s * ds) / var * (x - a * self.m)

    def score(self, x, t):
        a, s, _, _ = self.coefficients(t, x.ndim)
        return -(x - a * self.m) / (a * a * self.v + s * s)

    def marginal(self, t: float):
        c = self.scheduler(torch.tensor([t], dtype=torch.float64))
        a, s = c.alpha_t.item(), c.sigma_t.item()
        return a * self.m, a * a * self.v + s * s


def test_registered_by_its_own_distribution():
    assert "euler_maruyama" in registry.available("solver")
    component = registry.get("solver", "euler_maruyama")
    assert component.distribution == "flowforge-sde"
    info = next(p for p in registry.plugins() if p.name == component.plugin)
    assert info.error is None and ("solver", "euler_maruyama") in info.components


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@settings(max_examples=30, deadline=None, database=None)
@given(t=times(0.02, 0.98), mean=st.floats(-2, 2), var=st.floats(0.05, 4.0))
def test_score_from_velocity_is_the_gaussian_score(name, t, mean, var):
    """s = (alpha u - d_alpha x) / (sigma (d_alpha sigma - alpha d_sigma)) is exact for Gaussian data."""
    from flowforge_sde.sampler import score_from_velocity

    scheduler = SCHEDULERS[name]
    field = GaussianVelocity(scheduler, torch.tensor(mean, dtype=torch.float64), torch.tensor(var, dtype=torch.float64))
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(7, 1)
    tt = torch.full((7,), t, dtype=torch.float64)
    got = score_from_velocity(field(x, tt), x, tt, scheduler)
    torch.testing.assert_close(got, field.score(x, tt), rtol=1e-9, atol=1e-9)


def test_score_at_the_source_is_that_of_a_standard_gaussian():
    from flowforge_sde.sampler import score_from_velocity

    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.zeros(5, dtype=torch.float64)
    u = torch.randn(5, 3, dtype=torch.float64)  # at t = 0 the velocity does not enter: alpha_0 = 0
    torch.testing.assert_close(score_from_velocity(u, x, t, registry.build("scheduler", {"plugin": "cond_ot"})), -x)


def test_zero_diffusion_is_the_euler_ode_solver():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def field(x, t, y=None):
        return torch.tanh(x @ w) * (1 + t[:, None])

    ode = registry.build("solver", {"plugin": "ode", "method": "euler", "steps": 17})
    for diffusion in ("sigma", "constant"):
        solver = sde(steps=17, scale=0.0, diffusion=diffusion)
        ours = solver.sample(field, x0, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours.x, ode.sample(field, x0).x, rtol=1e-12, atol=1e-12)


def test_passes_the_solver_conformance_kit_at_zero_diffusion():
    """With g = 0 the sampler is a first-order, one-evaluation-per-step solver, and the kit checks it as one."""
    solver_kit.check_solver(lambda method, steps: sde(steps=steps, scale=0.0), {"euler": (1, 1)})


@pytest.mark.parametrize("diffusion,scale", [("sigma", 1.0), ("constant", 0.5)])
def test_stochastic_sampler_contract(diffusion, scale):
    """nfe = steps = model calls, t is (B,), shapes and dtype, trajectories, noise from the generator alone."""
    solver = sde(steps=12, scale=scale, diffusion=diffusion)
    x0 = torch.randn(6, 2, 3)
    field = solver_kit.CountingField(lambda x, t: -x)
    out = solver.sample(field, x0, generator=torch.Generator().manual_seed(0), intermediates=True)
    assert out.nfe == 12 == field.calls
    assert out.x.shape == x0.shape and out.x.dtype == x0.dtype and torch.isfinite(out.x).all()
    assert out.trajectory.shape == (13, 6, 2, 3) and torch.equal(out.trajectory[0], x0)
    assert torch.equal(out.trajectory[-1], out.x) and out.times.shape == (13,)
    torch.manual_seed(123)
    again = solver.sample(field, x0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(456)
    other = solver.sample(field, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.x, out.x), "the same generator seed must give the same samples"
    assert not torch.allclose(other.x, out.x), "independent generators must give different samples"


@pytest.mark.parametrize("scheduler_name", ["cond_ot", "local_cosine"])
@pytest.mark.parametrize("diffusion,scale,denoise_last", [("sigma", 1.0, True), ("sigma", 3.0, True),
                                                          ("constant", 1.0, False)])
def test_sde_preserves_the_marginals(scheduler_name, diffusion, scale, denoise_last):
    """Under the exact velocity of Gaussian data, the samples at t = 1/2 and t = 1 have the marginals p_t.

    (With a constant diffusion the last step's noise, g^2 h, is not small next to a narrow data
    variance, so skipping it, ``denoise_last``, visibly narrows the samples: that variant keeps it.)
    """
    scheduler = SCHEDULERS[scheduler_name]
    m = torch.tensor([1.0, -0.5], dtype=torch.float64)
    v = torch.tensor([0.25, 0.04], dtype=torch.float64)
    field = GaussianVelocity(scheduler, m, v)
    n, steps = 10000, 100
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sde(scheduler, steps=steps, scale=scale, diffusion=diffusion, denoise_last=denoise_last).sample(
        field, x0, generator=torch.Generator().manual_seed(1), intermediates=True)
    for k in (steps // 2, steps):
        t = out.times[k].item()
        mean, var = field.marginal(t)
        xs = out.trajectory[k]
        se = torch.sqrt(var / n)
        assert torch.all((xs.mean(0) - mean).abs() < 5 * se + 0.01), (t, xs.mean(0), mean)
        assert torch.all((xs.var(0) / var - 1).abs() < 0.06), (t, xs.var(0), var)
    # and the noise did something: the SDE's samples are not the ODE's
    ode = sde(scheduler, steps=steps, scale=0.0).sample(field, x0)
    assert (ode.x - out.x).abs().mean() > 0.01


def test_needs_a_scheduler():
    with pytest.raises(registry.ConfigError, match=r"\[scheduler\]"):
        registry.build("solver", {"plugin": "euler_maruyama"})


def test_options_are_validated():
    with pytest.raises(registry.ConfigError, match="diffusion"):
        sde(diffusion="brownian")
    with pytest.raises(registry.ConfigError, match="scale"):
        sde(scale=-1.0)


def test_experiment_file_runs(tmp_path):
    """The experiment file builds every section through the registry and runs (briefly) end to end."""
    from core.run import run

    overrides = ["trainer.steps=10", "trainer.batch_size=64", "trainer.log_every=5", "trainer.warmup_steps=0",
                 "trainer.checkpoint_every=0", "backbone.hidden=32", "backbone.depth=2", "eval.num_samples=128",
                 "eval.num_pictures=0", "eval.batch_size=128", "solver.steps=8"]
    summary = run(EXPERIMENT, overrides, out=tmp_path / "run")
    assert summary["steps"] == 10
    assert all(math.isfinite(v) for v in summary["metrics"].values()) and summary["metrics"]
    config = (tmp_path / "run" / "config.toml").read_text()
    assert 'plugin = "euler_maruyama"' in config and "diffusion =" in config
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert "flowforge-sde" in json.dumps(env)
