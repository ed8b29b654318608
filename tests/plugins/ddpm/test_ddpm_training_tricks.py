"""Training tricks of the ddpm objective: min-SNR / SNR weights, offset noise, input perturbation and the
zero-terminal-SNR rescale, against diffusers' own code and the closed forms of the papers."""

from __future__ import annotations

import pytest
import torch

import registry
from core import rng
from core.interfaces import DataSpec
from plugins.ddpm.diffusion import named_betas, time_to_step
from plugins.ddpm.weighting import loss_weights, snr
from registry import ConfigError

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale  # noqa: E402
from diffusers.training_utils import compute_snr  # noqa: E402

SPEC = DataSpec((2, 3, 3))
T = 100
PREDICTIONS = {"epsilon": "epsilon", "x_start": "sample", "v": "v_prediction"}


def build(path_options=None, **options):
    path = registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "linear", "steps": T,
                                   **(path_options or {})}, spec=SPEC)
    return registry.build("objective", {"plugin": "ddpm", **options}, spec=SPEC, path=path), path


class Recorder(torch.nn.Module):
    """Returns ``scale * x`` and records every call's inputs."""

    def __init__(self, scale=0.0):
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, x, t, y=None):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.scale * x


def batch(n=64, seed=0):
    x = torch.rand(n, *SPEC.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"x": x.double(), "seeds": rng.example_seeds(seed, 3, torch.arange(n))}


def implied_noise(path, x_t, t, x_start):
    k = time_to_step(t, T)
    ab = path.diffusion.tables["alphas_cumprod"][k].reshape(-1, 1, 1, 1)
    return (x_t - ab.sqrt() * x_start) / (1 - ab).sqrt(), k


def diffusers_min_snr(prediction, k, gamma):
    """train_text_to_image.py's weights (diffusers' compute_snr; x_start from the paper: min(SNR, gamma))."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=named_betas("linear", T).numpy(),
                                    prediction_type=PREDICTIONS[prediction])
    sched.alphas_cumprod = torch.cumprod(1 - named_betas("linear", T), 0)  # its table in float64
    s = compute_snr(sched, k).double()
    w = torch.stack([s, gamma * torch.ones_like(s)], dim=1).min(dim=1)[0]
    return {"epsilon": w / s, "v": w / (s + 1), "x_start": w}[prediction]


@pytest.mark.parametrize("prediction", sorted(PREDICTIONS))
def test_min_snr_weights_are_diffusers_train_text_to_image_weights(prediction):
    _, path = build({"prediction": prediction})
    k = torch.arange(T)
    ours = loss_weights(snr(path.diffusion, k), prediction, "min_snr", 5.0)
    torch.testing.assert_close(ours, diffusers_min_snr(prediction, k, 5.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction", sorted(PREDICTIONS))
@pytest.mark.parametrize("weighting, w_x0", [("min_snr", lambda s: s.clamp(max=2.0)), ("snr", lambda s: s)])
def test_weighted_error_of_any_target_is_the_x_start_error_times_its_weight(prediction, weighting, w_x0):
    """w_pred |pred - pred_hat|^2 == w(SNR) |x0 - x0_hat|^2 for every target (the identities of Hang et al.)."""
    _, path = build({"prediction": prediction})
    d, g = path.diffusion, torch.Generator().manual_seed(1)
    k = torch.randint(T, (32,), generator=g)
    x0, eps, out = (torch.randn(32, 4, dtype=torch.float64, generator=g) for _ in range(3))
    x_t = d.q_sample(x0, k, eps)
    own = ((d.target(x0, eps, k) - out) ** 2).mean(1)
    x0_err = ((x0 - d.predict_xstart(x_t, k, out)) ** 2).mean(1)
    s = snr(d, k)
    torch.testing.assert_close(loss_weights(s, prediction, weighting, 2.0) * own, w_x0(s) * x0_err)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_weighted_objective_is_the_mean_of_weighted_per_example_errors(prediction):
    objective, path = build({"prediction": prediction}, weighting="min_snr", snr_gamma=5.0)
    model, b = Recorder(0.3), batch()
    loss, logs = objective.loss({"model": model}, b, 0)
    (x_t, t), = model.calls
    noise, k = implied_noise(path, x_t, t, b["x"])
    target = noise if prediction == "epsilon" else path.diffusion.v_from(b["x"], noise, k)
    mse = ((target - 0.3 * x_t) ** 2).mean(dim=(1, 2, 3))
    expected = (diffusers_min_snr(prediction, k, 5.0) * mse).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["mse"].double(), mse.mean(), rtol=1e-5, atol=0)


def test_offset_noise_is_one_gaussian_shift_per_channel():
    objective, path = build(noise_offset=0.5)
    model, b = Recorder(), batch(n=512)
    objective.loss({"model": model}, b, 0)
    (x_t, t), = model.calls
    noise, _ = implied_noise(path, x_t, t, b["x"])
    base = rng.normal(b["seeds"], SPEC.shape, "noise", torch.float64)
    shift = noise - base
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)  # constant over H, W
    per_channel = shift[:, :, 0, 0]
    assert abs(per_channel.std().item() - 0.5) < 0.05 and abs(per_channel.mean().item()) < 0.05
    assert abs(torch.corrcoef(per_channel.T)[0, 1].item()) < 0.15  # independent channels


def test_input_perturbation_builds_x_t_from_perturbed_noise_but_regresses_on_the_noise():
    objective, path = build(input_perturbation=0.1)
    model, b = Recorder(), batch(n=512)
    loss, _ = objective.loss({"model": model}, b, 0)  # the model outputs 0: the loss is mean(target^2)
    (x_t, t), = model.calls
    noise, _ = implied_noise(path, x_t, t, b["x"])
    base = rng.normal(b["seeds"], SPEC.shape, "noise", torch.float64)
    assert abs((noise - base).std().item() - 0.1) < 0.01
    torch.testing.assert_close(loss.double(), (base ** 2).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("options", [{"noise_offset": 0.1, "input_perturbation": 0.1, "weighting": "min_snr"}])
def test_every_draw_is_per_example(options):
    """Two halves of a batch give the same per-example inputs as the whole: process-count invariance."""
    objective, _ = build(**options)
    whole, halves, b = Recorder(), Recorder(), batch(n=16)
    objective.loss({"model": whole}, b, 0)
    for part in (slice(0, 8), slice(8, 16)):
        objective.loss({"model": halves}, {"x": b["x"][part], "seeds": b["seeds"][part]}, 0)
    torch.testing.assert_close(whole.calls[0][0], torch.cat([halves.calls[0][0], halves.calls[1][0]]))


def test_defaults_draw_exactly_what_they_drew_before():
    objective, path = build()
    model, b = Recorder(), batch()
    objective.loss({"model": model}, b, 0)
    noise, _ = implied_noise(path, model.calls[0][0], model.calls[0][1], b["x"])
    torch.testing.assert_close(noise, rng.normal(b["seeds"], SPEC.shape, "noise", torch.float64))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_betas_are_diffusers(schedule):
    _, path = build({"schedule": schedule, "prediction": "v", "zero_terminal_snr": True})
    ours = path.diffusion.tables["betas"]
    torch.testing.assert_close(ours, diffusers_rescale(named_betas(schedule, T)), rtol=1e-12, atol=1e-12)
    ab, ab_orig = path.diffusion.tables["alphas_cumprod"], torch.cumprod(1 - named_betas(schedule, T), 0)
    assert ab[-1] == 0 and torch.isclose(ab[0], ab_orig[0], rtol=1e-12)


def test_zero_terminal_snr_with_v_trains_at_the_last_step_and_samples_with_trailing_spacing():
    objective, path = build({"prediction": "v", "zero_terminal_snr": True}, weighting="min_snr")
    d = path.diffusion
    x0, eps = torch.randn(4, *SPEC.shape, dtype=torch.float64), torch.randn(4, *SPEC.shape, dtype=torch.float64)
    k = torch.full((4,), T - 1)
    torch.testing.assert_close(d.target(x0, eps, k), -x0)  # v at zero SNR is -x_start
    loss, _ = objective.loss({"model": Recorder(0.5)}, batch(), 0)
    assert torch.isfinite(loss)
    solver = registry.build("solver", {"plugin": "dpm_solver", "steps": 10, "spacing": "trailing"}, path=path)
    assert solver.steps[0] == T - 1
    out = solver.sample(lambda x, t, y=None: 0.1 * x, torch.randn(3, *SPEC.shape, dtype=torch.float64))
    assert torch.isfinite(out.x).all()
    for name in ("ddim", "ddpm_ancestral"):  # both start at the zero-SNR step T-1
        out = registry.build("solver", {"plugin": name}, path=path).sample(lambda x, t, y=None: 0.1 * x,
                                                                            torch.randn(3, *SPEC.shape, dtype=torch.float64))
        assert torch.isfinite(out.x).all(), name


@pytest.mark.parametrize("path_options, options, key", [
    ({"zero_terminal_snr": True}, {}, "zero_terminal_snr"),
    ({}, {"weighting": "min_snr", "loss_type": "kl"}, "weighting"),
    ({}, {"snr_gamma": 0.0}, "snr_gamma"),
    ({}, {"noise_offset": -0.1}, "noise_offset"),
    ({}, {"input_perturbation": -1.0}, "input_perturbation"),
])
def test_bad_options_are_config_errors(path_options, options, key):
    with pytest.raises(ConfigError) as info:
        build(path_options, **options)
    assert key in str(info.value)
