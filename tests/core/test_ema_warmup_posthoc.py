"""EMA warm-up (Meta's rule, diffusers' power / inv_gamma form) against diffusers' EMAModel, and post-hoc EMA
(EDM2) reconstruction against the exact power-function EMA of a synthetic trajectory in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core import checkpoint as ckpt
from core import posthoc_ema as ph
from core.config import TrainerConfig
from core.ema import EMA, Warmup
from core.run import run
from registry import ConfigError

from ..conftest import RF2D


def trajectory(model, steps, seed=0):
    """Random walk of `model`'s weights: yields after each in-place change."""
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        yield s


@pytest.mark.parametrize("options", [
    dict(power=2 / 3, inv_gamma=1.0, min_decay=0.0, update_after_step=0),
    dict(power=0.75, inv_gamma=2.0, min_decay=0.3, update_after_step=3),
])
def test_power_warmup_is_diffusers_ema_model(options):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ours = EMA(model, 0.999, Warmup("power", **options))
    theirs = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, foreach=False, **options)
    for s in trajectory(model, 40):
        ours.update(model, s)
        theirs.step(model.parameters())
        assert ours.warmup.beta(0.999, s + 1) == theirs.cur_decay_value
    for a, b in zip(ours.model.parameters(), theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_meta_warmup_is_min_decay_one_plus_n_over_ten_plus_n():
    """Meta flow_matching's EMA: at update n, decay_n = min(decay, (1 + n) / (10 + n)); reference loop here."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    ema = EMA(model, 0.9, Warmup("meta"))
    shadow = [p.detach().clone() for p in model.parameters()]
    for s in trajectory(model, 30):
        ema.update(model, s)
        n = s + 1
        d = min(0.9, (1 + n) / (10 + n))
        shadow = [d * a + (1 - d) * p.detach() for a, p in zip(shadow, model.parameters())]
    for a, b in zip(ema.model.parameters(), shadow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_warmup_is_bitwise_the_constant_rate_at_any_step():
    torch.manual_seed(2)
    model = nn.Linear(3, 2)
    a, b = EMA(model, 0.99), EMA(model, 0.99)
    for s in trajectory(model, 5):
        a.update(model)
        b.update(model, s + 1000)
    assert torch.equal(a.model.weight, b.model.weight)


# --------------------------------------------------------------------------- post-hoc EMA
def test_sigma_rel_and_gamma_are_inverse_and_match_edm2():
    assert math.isclose(ph.sigma_rel_to_gamma(0.05), 16.97, abs_tol=0.01)  # EDM2 Figure 3
    assert math.isclose(ph.sigma_rel_to_gamma(0.10), 6.94, abs_tol=0.01)
    for g in (0.5, 3.0, 16.97, 80.0):
        assert math.isclose(ph.sigma_rel_to_gamma(ph.gamma_to_sigma_rel(g)), g, rel_tol=1e-9)


@pytest.mark.parametrize("g_a, n_a, g_b, n_b", [(6.94, 300.0, 16.97, 1000.0), (16.97, 1000.0, 2.0, 400.0)])
def test_profile_inner_product_is_the_integral_of_the_profiles(g_a, n_a, g_b, n_b):
    tau = torch.linspace(0, max(n_a, n_b), 400001, dtype=torch.float64)

    def profile(g, n):
        return torch.where(tau <= n, (g + 1) * tau ** g / n ** (g + 1), torch.zeros_like(tau))

    numeric = torch.trapezoid(profile(g_a, n_a) * profile(g_b, n_b), tau)
    closed = ph.profile_inner(torch.tensor(g_a), torch.tensor(n_a), torch.tensor(g_b), torch.tensor(n_b))
    assert math.isclose(float(closed), float(numeric), rel_tol=1e-3)  # trapezoid at the jump


def exact_power_ema(thetas, gamma):
    """sum_j w_j theta_j with w_j = (j^(g+1) - (j-1)^(g+1)) / n^(g+1), computed directly."""
    n = thetas.shape[0]
    j = torch.arange(1, n + 1, dtype=torch.float64)
    w = (j ** (gamma + 1) - (j - 1) ** (gamma + 1)) / n ** (gamma + 1)
    return (w[:, None] * thetas).sum(0)


def synthetic_run(steps=3000, every=100, seed=0):
    """A parameter trajectory drifting smoothly plus noise; PowerEMA snapshots of sigma_rel 0.05 and 0.10."""
    g = torch.Generator().manual_seed(seed)
    n = torch.arange(1, steps + 1, dtype=torch.float64)[:, None]
    thetas = torch.sin(n / 700.0 * torch.tensor([1.0, 2.0, 3.0, 0.5])) + 0.3 * torch.randn(steps, 4, generator=g,
                                                                                             dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    power, snaps = ph.PowerEMA(model, [0.05, 0.10]), []
    for s in range(steps):
        with torch.no_grad():
            model.weight.copy_(thetas[s][None])
        power.update(model, s)
        if (s + 1) % every == 0:
            snaps += power.snapshots(s)
    return thetas, snaps


def test_power_ema_is_the_telescoped_power_profile():
    thetas, snaps = synthetic_run(steps=500)
    for gamma, n, state in snaps[-2:]:
        torch.testing.assert_close(state["weight"][0], exact_power_ema(thetas[:n], gamma), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.065, 0.08, 0.15])
def test_posthoc_reconstruction_approaches_the_exact_ema(sigma_rel):
    thetas, snaps = synthetic_run()
    exact = exact_power_ema(thetas, ph.sigma_rel_to_gamma(sigma_rel))
    rebuilt = ph.reconstruct(snaps, sigma_rel)["weight"][0]
    nearest = [s for s in snaps if s[1] == 3000]
    stored_gap = min((s[2]["weight"][0] - exact).norm() for s in nearest)
    err = (rebuilt - exact).norm()
    assert err < 0.05 * stored_gap and err < 2e-3, (float(err), float(stored_gap))


def test_reconstructing_a_stored_profile_returns_the_snapshot():
    _, snaps = synthetic_run(steps=1000)
    rebuilt = ph.reconstruct(snaps, 0.10)["weight"]
    stored = next(s[2]["weight"] for s in snaps if s[1] == 1000 and math.isclose(s[0], ph.sigma_rel_to_gamma(0.10)))
    torch.testing.assert_close(rebuilt, stored, rtol=1e-6, atol=1e-8)


def test_training_run_stores_snapshots_that_reconstruct(tmp_path, tiny_rf2d):
    out = tmp_path / "posthoc"
    run(RF2D, [*tiny_rf2d, "trainer.steps=6", "trainer.posthoc_ema=[0.05, 0.1]", "trainer.posthoc_ema_every=2",
               "trainer.ema_warmup='meta'"], out=out)
    snaps = ph.load_snapshots(out / "ema_snapshots")
    assert sorted({n for _, n, _ in snaps}) == [2, 4, 6] and len(snaps) == 6
    state = ckpt.load(ckpt.latest(out / "checkpoints"))
    rebuilt = ph.reconstruct(snaps, 0.1)
    for key, value in state["posthoc_ema"]["0.1"].items():
        torch.testing.assert_close(rebuilt[key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{"posthoc_ema": [0.4], "posthoc_ema_every": 10}, {"posthoc_ema": [0.05]},
                                     {"ema_power": 0.0}, {"ema_min_decay": 1.0}])
def test_bad_ema_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        TrainerConfig(**options)
