"""The ddpm_ancestral and ddim solvers: the time mapping, DDIM determinism, oracle models, eta = 1, respacing,
and classifier-free guidance of learned-variance models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import registry
from core.guidance import ClassifierFreeGuidance, guided
from core.interfaces import DataSpec
from core.testing.strategies import data_shapes, seeds
from plugins.ddpm.diffusion import GaussianDiffusion, time_to_step
from plugins.ddpm.objective import MeanGuidance
from registry import ConfigError


def make_path(schedule="cosine", steps=10, prediction="epsilon", variance="fixed_small"):
    return registry.build("path", {"plugin": "gaussian_diffusion", "schedule": schedule, "steps": steps,
                                   "prediction": prediction, "variance": variance}, spec=DataSpec((3,)))


def make_solver(path, name="ddim", **options):
    return registry.build("solver", {"plugin": name, **options}, path=path)


class Recorder:
    """A model that records the times it is called with."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, x, t, y=None):
        assert t.shape == (x.shape[0],)
        self.times.append(t[0].item())
        return self.fn(x, t)


def oracle(path, point):
    """The exact model of the one-point data distribution at `point`, for the path's prediction type."""
    d = path.diffusion

    def model(x, t, y=None):
        k = time_to_step(t, d.num_timesteps).to(x.device)
        x_start = point.expand_as(x)
        eps = d.eps_from_xstart(x, k, x_start)
        out = {"epsilon": eps, "x_start": x_start, "v": d.v_from(x_start, eps, k)}[d.prediction]
        if d.learned_variance:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out

    return model


def test_the_model_sees_t_equal_one_minus_k_plus_one_over_T():
    path = make_path(steps=10)
    rec = Recorder(lambda x, t: torch.zeros_like(x))
    result = make_solver(path, "ddpm_ancestral").sample(rec, torch.zeros(2, 3, dtype=torch.float64))
    assert rec.times == pytest.approx([1 - (k + 1) / 10 for k in reversed(range(10))])  # 0.0, 0.1, ..., 0.9
    assert result.nfe == 10
    rec = Recorder(lambda x, t: torch.zeros_like(x))
    result = make_solver(path, "ddim", respacing="ddim5").sample(rec, torch.zeros(2, 3, dtype=torch.float64))
    assert rec.times == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])  # kept steps 8, 6, 4, 2, 0 keep their times
    assert result.nfe == 5


def test_trajectory_holds_every_state_with_its_time():
    path = make_path(steps=10)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    out = make_solver(path, "ddim", respacing="ddim5").sample(lambda x, t, y: -x, x0, intermediates=True)
    assert out.trajectory.shape == (6, 4, 3) and torch.equal(out.trajectory[0], x0)
    assert torch.equal(out.trajectory[-1], out.x)
    assert out.times.tolist() == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["linear", "cosine"]), st.integers(21, 200), st.sampled_from(["epsilon", "x_start", "v"]),
       st.sampled_from(["fixed_small", "learned_range"]), data_shapes(max_dims=3, max_side=3), seeds(),
       st.sampled_from(["", "ddim5", "3,2", "7"]))
def test_ddim_eta0_with_an_oracle_lands_on_the_point(schedule, T, prediction, variance, shape, seed, respacing):
    path = make_path(schedule, T, prediction, variance)
    g = torch.Generator().manual_seed(seed)
    point = torch.rand(1, *shape, generator=g, dtype=torch.float64) * 2 - 1
    x_init = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    solver = make_solver(path, "ddim", respacing=respacing, eta=0.0, clip_denoised=False)
    a = solver.sample(oracle(path, point), x_init, generator=torch.Generator().manual_seed(1)).x
    b = solver.sample(oracle(path, point), x_init, generator=torch.Generator().manual_seed(2)).x
    assert torch.equal(a, b), "DDIM with eta = 0 must not depend on the generator"
    torch.testing.assert_close(a, point.expand_as(a), rtol=0, atol=1e-8)
    # ancestral sampling with the oracle lands there too: its last step has coef1 = 1, coef2 = 0
    anc = make_solver(path, "ddpm_ancestral", respacing=respacing, clip_denoised=False)
    c = anc.sample(oracle(path, point), x_init, generator=torch.Generator().manual_seed(3)).x
    torch.testing.assert_close(c, point.expand_as(c), rtol=0, atol=1e-8)


def test_ddim_eta0_is_deterministic_for_any_model():
    path = make_path("linear", 100)
    w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = make_solver(path, "ddim", respacing="ddim20")
    x0 = torch.randn(5, 3, dtype=torch.float64)
    a = solver.sample(lambda x, t, y: torch.tanh(x @ w), x0, generator=torch.Generator().manual_seed(0)).x
    b = solver.sample(lambda x, t, y: torch.tanh(x @ w), x0, generator=torch.Generator().manual_seed(9)).x
    assert torch.equal(a, b)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["linear", "cosine"]), st.integers(21, 300), st.sampled_from(["", "ddim7", "5,3"]))
def test_ddim_eta1_variance_is_the_ancestral_fixed_small_variance(schedule, T, respacing):
    # "ddimN" exists only when some integer stride s gives exactly N steps 0, s, 2s, ... (guided-diffusion)
    assume(respacing != "ddim7" or any(len(range(0, T, s)) == 7 for s in range(1, T)))
    d = GaussianDiffusion.named(schedule, T, variance="fixed_small").respaced(respacing)
    k = torch.arange(d.num_timesteps)
    like = torch.zeros(d.num_timesteps, dtype=torch.float64)
    sigma2 = d.ddim_sigma(k, 1.0, like) ** 2
    torch.testing.assert_close(sigma2, d.tables["posterior_variance"], rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_eta1_step_is_the_ancestral_fixed_small_step(clip, prediction):
    """Same noise, same model: eta = 1 DDIM and fixed_small ancestral sampling give the same samples."""
    path = make_path("cosine", 50, prediction, "fixed_small")
    w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def model(x, t, y=None):
        return torch.tanh(x @ w) * (1 + t[:, None])

    x0 = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ddim = make_solver(path, "ddim", eta=1.0, clip_denoised=clip, respacing="10")
    anc = make_solver(path, "ddpm_ancestral", clip_denoised=clip, respacing="10")
    a = ddim.sample(model, x0, generator=torch.Generator().manual_seed(5), intermediates=True).trajectory
    b = anc.sample(model, x0, generator=torch.Generator().manual_seed(5), intermediates=True).trajectory
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_output_shape_dtype_and_batch_independence():
    path = make_path("cosine", 30, variance="learned_range")

    def model(x, t, y=None):
        return torch.cat([torch.tanh(x) * t.reshape(-1, *[1] * (x.ndim - 1)), torch.zeros_like(x)], dim=1)

    for dtype in (torch.float32, torch.float64):
        x0 = torch.randn(4, 2, 5, dtype=dtype)
        out = make_solver(path, "ddpm_ancestral").sample(model, x0, generator=torch.Generator().manual_seed(0))
        assert out.x.shape == x0.shape and out.x.dtype == dtype and torch.isfinite(out.x).all()
    x0 = torch.randn(4, 2, 5, dtype=torch.float64)
    whole = make_solver(path, "ddim").sample(model, x0).x
    for i in range(4):
        torch.testing.assert_close(make_solver(path, "ddim").sample(model, x0[i:i + 1]).x, whole[i:i + 1])


def test_clip_denoised_clamps_the_predicted_x_start():
    path = make_path("cosine", 20, prediction="x_start", variance="fixed_small")
    def far(x, t, y=None):  # predicts x_start = 5 everywhere
        return torch.full_like(x, 5.0)

    x0 = torch.randn(3, 3, dtype=torch.float64)
    clipped = make_solver(path, "ddim", clip_denoised=True).sample(far, x0).x
    raw = make_solver(path, "ddim", clip_denoised=False).sample(far, x0).x
    torch.testing.assert_close(clipped, torch.ones_like(clipped))
    torch.testing.assert_close(raw, torch.full_like(raw, 5.0))


def test_impossible_respacing_is_a_config_error_at_build_time():
    path = make_path("linear", 1000)
    with pytest.raises(ConfigError) as info:
        make_solver(path, "ddim", respacing="ddim47")
    assert info.value.path == ("respacing",) and "ddim46 and ddim48" in str(info.value)
    with pytest.raises(ConfigError, match="gaussian_diffusion"):
        registry.build("solver", {"plugin": "ddim"}, path=None)


def test_guidance_of_learned_variance_models_guides_only_the_mean():
    spec = DataSpec((2, 3), num_classes=4)
    path = registry.build("path", {"plugin": "gaussian_diffusion", "variance": "learned_range"}, spec=spec)
    objective = registry.build("objective", {"plugin": "ddpm"}, spec=spec, path=path)

    class Model(torch.nn.Module):
        def forward(self, x, t, y=None):
            mean = x + y.float().reshape(-1, 1, 1)
            var = torch.zeros_like(x) + 0.1 * y.float().reshape(-1, 1, 1)
            return torch.cat([mean, var], dim=1)

    model, w = Model(), 2.0
    field = objective.sampling_model(guided(model, w, spec.num_classes))
    assert isinstance(field, MeanGuidance)
    x, t, y = torch.randn(5, 2, 3), torch.rand(5), torch.tensor([0, 1, 2, 3, 1])
    out = field(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 4))
    torch.testing.assert_close(out[:, :2], (1 + w) * cond[:, :2] - w * uncond[:, :2])
    torch.testing.assert_close(out[:, 2:], cond[:, 2:])  # the conditional variance, unguided
    # fixed variances keep the runner's wrapper: guiding epsilon, x_start or v is the same thing
    fixed = registry.build("objective", {"plugin": "ddpm"}, spec=spec, path=make_path())
    wrapper = guided(model, w, spec.num_classes)
    assert type(fixed.sampling_model(wrapper)) is ClassifierFreeGuidance
