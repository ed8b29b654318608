"""Same numbers as diffusers' DDPMScheduler / DDIMScheduler (skipped when diffusers is not installed).

diffusers keeps its tables in float32, so agreement is to float32 precision.
"""

from __future__ import annotations

import pytest
import torch

from plugins.ddpm.diffusion import GaussianDiffusion

diffusers = pytest.importorskip("diffusers")

T = 1000
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"epsilon": "epsilon", "x_start": "sample", "v": "v_prediction"}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_cumulative_alphas(schedule):
    ours = GaussianDiffusion.named(schedule, T).tables["alphas_cumprod"]
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[schedule]).alphas_cumprod
    torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction", sorted(PREDICTIONS))
def test_ancestral_step_mean_and_variance(prediction):
    d = GaussianDiffusion.named("cosine", T, prediction=prediction, variance="fixed_small")
    s = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small",
                                prediction_type=PREDICTIONS[prediction], clip_sample=True)
    s.set_timesteps(T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for k in (999, 500, 100, 5, 1):
        out = torch.randn(2, 3, 4, 4, generator=g)
        p = d.p_mean_variance(out, x, torch.full((2,), k), clip_denoised=True)
        step = s.step(out, k, x)
        torch.testing.assert_close(p.pred_xstart, step.pred_original_sample, rtol=1e-4, atol=1e-4)
        # the posterior variance; diffusers computes 1 - abar in float32, which costs ~1e-3 relative near k = 0
        torch.testing.assert_close(p.variance[0, 0, 0, 0].float(), s._get_variance(k).float(), rtol=2e-3, atol=1e-10)


def test_ddim50_trajectory():
    d = GaussianDiffusion.named("linear", T, variance="fixed_small").respaced("ddim50")
    s = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                                steps_offset=0, timestep_spacing="leading")
    s.set_timesteps(50)
    assert s.timesteps.tolist() == d.timestep_map.flip(0).tolist()
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)) * 0.3

    def model(x):
        return torch.einsum("bchw,cd->bdhw", torch.tanh(x), w)

    ours = theirs = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for i, t in zip(reversed(range(50)), s.timesteps):
        k = torch.full((2,), i)
        x_start = d.xstart_from_output(model(ours), ours, k)
        ab_prev = d.extract("alphas_cumprod_prev", k, ours)
        ours = x_start * ab_prev.sqrt() + (1 - ab_prev).sqrt() * d.eps_from_xstart(ours, k, x_start)
        theirs = s.step(model(theirs), int(t), theirs, eta=0.0).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
