"""Solvers check their path, and the ode solver integrates a diffusion model's probability-flow ODE: with an exact
Gaussian model it agrees with DDIM (eta = 0) in the limit of many steps, for every prediction type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import PchipInterpolator

import registry
from core.interfaces import DataSpec
from registry import ConfigError

from ...conftest import RF2D

SPEC = DataSpec((3,))
MU, STD = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.05], dtype=torch.float64)


def make_path(steps=250, prediction="epsilon", variance="fixed_small"):
    return registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "linear", "steps": steps,
                                   "prediction": prediction, "variance": variance}, spec=SPEC)


class Gaussian(torch.nn.Module):
    """The exact prediction for data N(MU, STD^2): written here from q(x_t | x_0), with the noise level between the
    process's steps by scipy's PchipInterpolator over the knots t_k = 1 - (k+1)/T and (t = 1, sigma = 0)."""

    def __init__(self, path, learned=False):
        super().__init__()
        abar = path.diffusion.tables["alphas_cumprod"].numpy()
        T = len(abar)
        self.t_knots = np.concatenate([1.0 - (np.arange(T)[::-1] + 1.0) / T, [1.0]])
        self.s_knots = np.concatenate([np.sqrt((1 - abar) / abar)[::-1], [0.0]])
        self.prediction, self.learned = path.diffusion.prediction, learned
        self.pchip = PchipInterpolator(self.t_knots, self.s_knots)

    def noise_level(self, t):
        return torch.from_numpy(self.pchip(t.double().numpy()))

    def forward(self, x, t, y=None):
        s = self.noise_level(t)[:, None]
        a = 1.0 / torch.sqrt(1 + s ** 2)
        sv = s * a
        eps = sv * (x - a * MU) / (a ** 2 * STD ** 2 + sv ** 2)
        x0 = MU + a * STD ** 2 * (x - a * MU) / (a ** 2 * STD ** 2 + sv ** 2)
        out = {"epsilon": eps, "x_start": x0, "v": a * eps - sv * x0}[self.prediction]
        return torch.cat([out, torch.zeros_like(out)], dim=1) if self.learned else out


def sample(path, model, plugin, x, **options):
    return registry.build("solver", {"plugin": plugin, **options}, path=path, spec=SPEC).sample(model, x).x


@pytest.mark.parametrize("prediction, variance", [("epsilon", "fixed_small"), ("x_start", "fixed_large"),
                                                  ("v", "learned_range")])
def test_ode_on_the_probability_flow_converges_to_ddim(prediction, variance):
    path = make_path(prediction=prediction, variance=variance)
    model = Gaussian(path, learned=variance.startswith("learned"))
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ode = sample(path, model, "ode", x, method="rk4", steps=250)  # one step per interval of the process
    gaps = [(sample(path, model, "ddim", x, respacing=r, clip_denoised=False) - ode).abs().max().item()
            for r in ("ddim25", "ddim125", "")]
    # DDIM is first order: its gap to the ODE's solution shrinks like 1 / steps
    assert gaps[0] > 3.5 * gaps[1] and gaps[1] > 1.6 * gaps[2] and gaps[2] < 0.02, gaps
    # the data distribution it lands on: the Gaussian's
    torch.testing.assert_close(ode.mean(0), MU, atol=0.1, rtol=0)


def test_the_ode_reference_is_converged():
    path = make_path()
    model = Gaussian(path)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    coarse, fine = (sample(path, model, "ode", x, method="rk4", steps=n) for n in (250, 500))
    assert (coarse - fine).abs().max() < 1e-4


def test_velocity_of_an_epsilon_model_is_the_probability_flow_of_the_vp_process():
    """dx/dt = alpha'(t) x0_hat + sigma_vp'(t) eps_hat with alpha, sigma_vp from the same interpolation."""
    path = make_path(steps=50)
    model, field = Gaussian(path), path.velocity_field(Gaussian(path))
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.rand(8, dtype=torch.float64) * 0.9
    h = 1e-6

    def coeffs(tt):
        s = model.noise_level(tt)[:, None]
        return 1 / torch.sqrt(1 + s ** 2), s / torch.sqrt(1 + s ** 2)

    (a0, s0), (a1, s1) = coeffs(t), coeffs(t + h)
    eps = model(x, t)
    x0 = (x - s0 * eps) / a0
    torch.testing.assert_close(field(x, t), (a1 - a0) / h * x0 + (s1 - s0) / h * eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver, path_plugin, words", [
    ({"plugin": "ddim"}, "affine", ["ddim", "gaussian_diffusion", "AffinePath"]),
    ({"plugin": "dpm_solver"}, "affine", ["dpm_solver", "gaussian_diffusion", "AffinePath"]),
    ({"plugin": "ode", "grid": "edm"}, "gaussian_diffusion", ["ode", "edm", "GaussianDiffusionPath"]),
])
def test_a_solver_that_cannot_integrate_the_path_is_a_config_error_naming_both(solver, path_plugin, words):
    if path_plugin == "affine":
        scheduler = registry.build("scheduler", {"plugin": "cond_ot"})
        path = registry.build("path", {"plugin": "affine"}, scheduler=scheduler)
    else:
        path, scheduler = make_path(), None
    with pytest.raises(ConfigError) as info:
        registry.build("solver", solver, path=path, scheduler=scheduler, spec=SPEC)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_ode_on_discrete_data_is_a_config_error():
    scheduler = registry.build("scheduler", {"plugin": "cond_ot"})
    path = registry.build("path", {"plugin": "mixture_discrete"}, spec=DataSpec((4,), kind="discrete", vocab_size=5),
                          scheduler=scheduler)
    with pytest.raises(ConfigError, match="ode solver.*discrete"):
        registry.build("solver", {"plugin": "ode"}, path=path, spec=DataSpec((4,), kind="discrete", vocab_size=5))


def test_exit_status_two_for_a_ddpm_solver_on_a_flow_path(capsys):
    from core import run

    status = run.main([str(RF2D), "--set", "solver={plugin='ddim'}", "--set", "trainer.steps=1"])
    err = capsys.readouterr().err
    assert status == 2 and "ddim" in err and "gaussian_diffusion" in err, err
