"""The DDPM process in float64: schedules, q(x_k | x_start), posteriors, variances, conversions, respacing.

Reference values are computed here independently with numpy from the betas,
following the formulas of Ho et al. and guided-diffusion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.testing.strategies import data_shapes, seeds
from plugins.ddpm.diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    named_betas,
    normal_kl,
    space_timesteps,
    step_to_time,
    time_to_step,
)

schedules = st.sampled_from(["linear", "cosine"])
step_counts = st.integers(21, 300)  # the linear schedule needs T > 20 (its last beta is 20 / T)
variances = st.sampled_from(["fixed_small", "fixed_large", "learned", "learned_range"])
predictions = st.sampled_from(["epsilon", "x_start", "v"])


def reference(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every coefficient from the betas, independently, in numpy float64."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    pv = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "ac": ac, "ac_prev": ac_prev, "pv": pv,
        "pv_log_clipped": np.log(np.append(pv[1], pv[1:])),
        "coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def batch_of(shape, batch, seed, steps):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    k = torch.randint(steps, (batch,), generator=g)
    return x, noise, k


# --------------------------------------------------------------------------- schedules
def test_linear_schedule_matches_ho_et_al():
    betas = named_betas("linear", 1000).numpy()
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-17)
    # any T: the same range scaled by 1000 / T
    np.testing.assert_allclose(named_betas("linear", 250).numpy(), np.linspace(4e-4, 0.08, 250), rtol=1e-15)


def test_cosine_schedule_matches_nichol_and_dhariwal():
    T = 1000

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    betas = named_betas("cosine", T).numpy()
    np.testing.assert_allclose(betas, expected, rtol=1e-15)
    assert betas.max() == pytest.approx(0.999)  # the last beta is clipped
    ac = np.cumprod(1 - betas)
    # abar_k = f((k+1)/T) / f(0) wherever no clipping happened
    s = (np.arange(T) + 1) / T
    ref = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    np.testing.assert_allclose(ac[:-1], ref[:-1], rtol=1e-9)


@settings(max_examples=30, deadline=None)
@given(schedules, step_counts)
def test_schedules_are_valid_for_any_T(schedule, T):
    d = GaussianDiffusion.named(schedule, T)
    betas, ac = d.tables["betas"], d.tables["alphas_cumprod"]
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert bool((betas > 0).all()) and bool((betas <= 0.999 + 1e-12).all())
    assert bool((ac[1:] < ac[:-1]).all()), "abar must decrease"


# --------------------------------------------------------------------------- the time mapping
def test_step_to_time_mapping_is_pinned():
    T = 10
    k = torch.arange(T)
    t = step_to_time(k, T)
    np.testing.assert_allclose(t.numpy(), 1 - (np.arange(T) + 1) / T, atol=1e-15)
    assert t[T - 1] == 0.0  # pure noise is the source, t = 0
    assert t[0] == pytest.approx(0.9)  # the least noisy step is 1 - 1/T; the data is t = 1
    assert torch.equal(time_to_step(t, T), k)
    assert time_to_step(torch.tensor([1.0, 0.0, -0.3, 2.0]), T).tolist() == [0, 9, 9, 0]


@settings(max_examples=30, deadline=None)
@given(step_counts, seeds())
def test_time_to_step_inverts_step_to_time(T, seed):
    k = torch.randint(T, (16,), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(time_to_step(step_to_time(k, T).float(), T), k)


# --------------------------------------------------------------------------- q and the posterior
@settings(max_examples=40, deadline=None)
@given(schedules, step_counts, data_shapes(), st.integers(1, 5), seeds())
def test_q_and_posterior_match_an_independent_float64_computation(schedule, T, shape, batch, seed):
    d = GaussianDiffusion.named(schedule, T)
    ref = reference(d.tables["betas"].numpy())
    x_start, noise, k = batch_of(shape, batch, seed, T)
    kk = k.numpy().reshape(-1, *[1] * len(shape))
    xs, nz = x_start.numpy(), noise.numpy()

    mean, var, log_var = d.q_mean_variance(x_start, k)
    np.testing.assert_allclose(mean.numpy(), np.sqrt(ref["ac"][kk]) * xs, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(1 - ref["ac"][kk], xs.shape), rtol=1e-12)
    np.testing.assert_allclose(log_var.numpy(), np.broadcast_to(np.log(1 - ref["ac"][kk]), xs.shape), rtol=1e-12)

    x_t = d.q_sample(x_start, k, noise)
    expected_xt = np.sqrt(ref["ac"][kk]) * xs + np.sqrt(1 - ref["ac"][kk]) * nz
    np.testing.assert_allclose(x_t.numpy(), expected_xt, rtol=1e-12, atol=1e-13)

    pm, pv, plv = d.q_posterior_mean_variance(x_start, x_t, k)
    np.testing.assert_allclose(pm.numpy(), ref["coef1"][kk] * xs + ref["coef2"][kk] * x_t.numpy(), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(pv.numpy(), np.broadcast_to(ref["pv"][kk], xs.shape), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(plv.numpy(), np.broadcast_to(ref["pv_log_clipped"][kk], xs.shape), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(schedules, step_counts)
def test_posterior_is_the_gaussian_product(schedule, T):
    """The posterior mean/variance equal the Bayes update of q(x_k | x_{k-1}) with q(x_{k-1} | x_start)."""
    d = GaussianDiffusion.named(schedule, T)
    betas = d.tables["betas"].numpy()
    ref = reference(betas)
    k = np.arange(1, T)
    # precision-weighted product of N(x_k / sqrt(alpha_k), beta_k / alpha_k) and N(sqrt(ac_prev) x0, 1 - ac_prev)
    a = 1 - betas[k]
    var = 1.0 / (a / betas[k] + 1.0 / (1 - ref["ac_prev"][k]))
    np.testing.assert_allclose(d.tables["posterior_variance"].numpy()[k], var, rtol=1e-9)
    coef_x0 = var * np.sqrt(ref["ac_prev"][k]) / (1 - ref["ac_prev"][k])
    coef_xt = var * np.sqrt(a) / betas[k]
    np.testing.assert_allclose(d.tables["posterior_mean_coef1"].numpy()[k], coef_x0, rtol=1e-9)
    np.testing.assert_allclose(d.tables["posterior_mean_coef2"].numpy()[k], coef_xt, rtol=1e-9)


def test_log_variance_clipping_at_step_zero():
    d = GaussianDiffusion.named("linear", 1000)
    pv = d.tables["posterior_variance"]
    assert pv[0] == 0.0  # the exact posterior at step 0 is a point mass
    clipped = d.tables["posterior_log_variance_clipped"]
    assert clipped[0] == torch.log(pv[1]) and torch.isfinite(clipped).all()
    assert torch.equal(clipped[1:], torch.log(pv[1:]))
    large = d.tables["fixed_large_log_variance"]
    assert large[0] == torch.log(pv[1]) and torch.equal(large[1:], torch.log(d.tables["betas"][1:]))


# --------------------------------------------------------------------------- variances
@settings(max_examples=30, deadline=None)
@given(schedules, step_counts, variances, seeds())
def test_model_variance_of_each_type(schedule, T, variance, seed):
    d = GaussianDiffusion.named(schedule, T, variance=variance)
    ref = reference(d.tables["betas"].numpy())
    x_start, noise, k = batch_of((2, 3), 4, seed, T)
    kk = k.numpy()[:, None, None]
    x_t = d.q_sample(x_start, k, noise)
    g = torch.Generator().manual_seed(seed + 1)
    extra = torch.rand(4, 2, 3, generator=g, dtype=torch.float64) * 2 - 1
    out = torch.cat([noise, extra], dim=1) if d.learned_variance else noise
    p = d.p_mean_variance(out, x_t, k)
    if variance == "fixed_small":
        expected = np.broadcast_to(ref["pv_log_clipped"][kk], (4, 2, 3))
    elif variance == "fixed_large":
        expected = np.broadcast_to(np.log(np.append(ref["pv"][1], d.tables["betas"].numpy()[1:]))[kk], (4, 2, 3))
    elif variance == "learned":
        expected = extra.numpy()
    else:
        frac = (extra.numpy() + 1) / 2
        expected = frac * np.log(d.tables["betas"].numpy())[kk] + (1 - frac) * ref["pv_log_clipped"][kk]
    np.testing.assert_allclose(p.log_variance.numpy(), expected, rtol=1e-12)
    if variance == "fixed_small":  # guided-diffusion: the variance is not clipped (0 at step 0), its log is
        np.testing.assert_allclose(p.variance.numpy(), np.broadcast_to(ref["pv"][kk], (4, 2, 3)), rtol=1e-12)
    else:
        np.testing.assert_allclose(p.variance.numpy(), np.exp(expected), rtol=1e-12)
    # the model's mean is the posterior mean at its own x_start prediction
    pm, _, _ = d.q_posterior_mean_variance(p.pred_xstart, x_t, k)
    torch.testing.assert_close(p.mean, pm)


def test_learned_variance_needs_twice_the_channels():
    d = GaussianDiffusion.named("cosine", 10, variance="learned_range")
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="out_channels_mult = 2"):
        d.p_mean_variance(torch.zeros(2, 3, 4), x, torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------- conversions
@settings(max_examples=40, deadline=None)
@given(schedules, step_counts, data_shapes(), st.integers(1, 4), seeds())
def test_epsilon_xstart_and_v_round_trip(schedule, T, shape, batch, seed):
    d = GaussianDiffusion.named(schedule, T)
    x_start, noise, k = batch_of(shape, batch, seed, T)
    x_t = d.q_sample(x_start, k, noise)
    v = d.v_from(x_start, noise, k)
    tol = {"rtol": 1e-7, "atol": 1e-7}
    torch.testing.assert_close(d.xstart_from_eps(x_t, k, noise), x_start, **tol)
    torch.testing.assert_close(d.eps_from_xstart(x_t, k, x_start), noise, **tol)
    torch.testing.assert_close(d.xstart_from_v(x_t, k, v), x_start, **tol)
    torch.testing.assert_close(d.eps_from_v(x_t, k, v), noise, **tol)
    # v from the converted pair is v again
    torch.testing.assert_close(d.v_from(d.xstart_from_eps(x_t, k, noise), d.eps_from_xstart(x_t, k, x_start), k), v, **tol)
    # every prediction type's target leads back to x_start through predict_xstart
    for prediction in ("epsilon", "x_start", "v"):
        dp = GaussianDiffusion.named(schedule, T, prediction=prediction)
        target = dp.target(x_start, noise, k)
        torch.testing.assert_close(dp.predict_xstart(x_t, k, target), x_start, **tol)


# --------------------------------------------------------------------------- respacing
def test_space_timesteps_follows_respace_py():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim30") == list(range(0, 1000, 34))  # a stride, not a divisor
    assert space_timesteps(10, "") == list(range(10))
    assert space_timesteps(300, "10") == sorted({round(i * 299 / 9) for i in range(10)})
    # sections: 100 steps in three sections of 34, 33, 33 (the first takes the remainder)
    assert space_timesteps(100, "2,1,3") == [0, 33, 34, 67, 83, 99]
    assert len(space_timesteps(4000, "10,15,20,25")) == 70


@pytest.mark.parametrize("spec, T, match", [
    ("ddim7", 10, "no integer stride"),
    ("ddim47", 1000, "nearest possible are ddim46 and ddim48"),
    ("ddimx", 10, "step count"),
    ("4,a", 10, "comma-separated"),
    ("8,8", 10, "cannot take 8 steps"),
])
def test_impossible_respacings_raise_clear_errors(spec, T, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(T, spec)


@settings(max_examples=40, deadline=None)
@given(schedules, st.integers(21, 400), st.data())
def test_respaced_process_keeps_the_cumulative_alphas(schedule, T, data):
    counts = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4).filter(lambda c: len(c) <= T))
    spec = ",".join(map(str, counts))
    size_per = T // len(counts)
    if any(c > size_per for c in counts):
        with pytest.raises(ValueError):
            space_timesteps(T, spec)
        return
    d = GaussianDiffusion.named(schedule, T, variance="learned_range")
    r = d.respaced(spec)
    kept = space_timesteps(T, spec)
    assert r.num_timesteps == len(kept) and r.timestep_map.tolist() == kept
    # exact up to float64 rounding of 1 - beta' (absolute, since abar can be tiny at the end)
    torch.testing.assert_close(r.tables["alphas_cumprod"], d.tables["alphas_cumprod"][kept], rtol=1e-12, atol=1e-15)
    # betas recomputed from the kept abar; the model still sees the original steps' times
    ac = d.tables["alphas_cumprod"][kept].numpy()
    np.testing.assert_allclose(r.tables["betas"].numpy(), 1 - ac / np.append(1.0, ac[:-1]), rtol=1e-12)
    torch.testing.assert_close(r.tables["model_time"], step_to_time(torch.tensor(kept), T))
    assert r.original_steps == T


def test_ddim_respacing_of_1000_steps():
    d = GaussianDiffusion.named("linear", 1000)
    r = d.respaced("ddim50")
    assert r.num_timesteps == 50
    torch.testing.assert_close(r.tables["alphas_cumprod"], d.tables["alphas_cumprod"][::20], rtol=1e-12, atol=0)
    assert r.tables["model_time"][0] == pytest.approx(0.999) and r.tables["model_time"][-1] == pytest.approx(0.019)
    assert d.respaced("") is d


# --------------------------------------------------------------------------- losses
def test_normal_kl_is_zero_for_equal_gaussians_and_positive_otherwise():
    m, lv = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-12
    assert (normal_kl(m, lv, m + 0.1, lv - 0.2) > 0).all()
    # closed form against a known value: KL(N(0,1) || N(1, e)) = 0.5 (-1 + 1 - 0 + e^-1 + e^-1)
    assert normal_kl(torch.tensor(0.0), torch.tensor(0.0), 1.0, 1.0).item() == pytest.approx(math.exp(-1))


def test_discretized_likelihood_sums_to_one_over_the_bins():
    bins = 256
    x = torch.linspace(-1, 1, bins, dtype=torch.float64)
    for mean, log_scale in [(0.0, -1.0), (0.3, -3.0), (-0.9, 0.5)]:
        lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)  # the tanh CDF approximation is not exact


def test_hybrid_loss_trains_the_variance_only_through_the_bound():
    T = 100
    x_start, noise, k = batch_of((2, 4), 8, 0, T)
    k = k.clamp(min=1)
    for loss_type, scale in [("mse", 1.0), ("rescaled_mse", T / 1000)]:
        d = GaussianDiffusion.named("cosine", T, variance="learned_range")
        x_t = d.q_sample(x_start, k, noise)
        out = torch.cat([noise + 0.1, torch.zeros_like(noise)], dim=1).requires_grad_(True)
        terms = d.training_losses(out, x_start, x_t, k, noise, loss_type)
        vb, _ = d.vb_terms_bpd(out.detach(), x_start, x_t, k)
        torch.testing.assert_close(terms["vb"], vb * scale)
        torch.testing.assert_close(terms["mse"], torch.full((8,), 0.01, dtype=torch.float64))
        # the gradient of the vb term w.r.t. the mean channels is zero: only the mse moves them
        terms["vb"].sum().backward()
        assert out.grad[:, :2].abs().max() == 0 and out.grad[:, 2:].abs().max() > 0


def test_kl_losses_are_the_bound_term():
    T = 50
    d = GaussianDiffusion.named("linear", T, variance="fixed_small")
    x_start, noise, k = batch_of((3,), 6, 1, T)
    x_t = d.q_sample(x_start, k, noise)
    out = noise * 0.9
    vb, _ = d.vb_terms_bpd(out, x_start, x_t, k)
    torch.testing.assert_close(d.training_losses(out, x_start, x_t, k, noise, "kl")["loss"], vb)
    torch.testing.assert_close(d.training_losses(out, x_start, x_t, k, noise, "rescaled_kl")["loss"], vb * T)
    assert set(d.training_losses(out, x_start, x_t, k, noise, "mse")) == {"loss", "mse"}
