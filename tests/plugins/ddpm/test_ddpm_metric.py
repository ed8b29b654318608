"""The ddpm_bpd metric: the variational bound in bits per dimension (calc_bpd_loop)."""

from __future__ import annotations

import math

import pytest
import torch

import registry
from core.data import TensorDataSource
from core.interfaces import DataSpec, ModelMetric
from plugins.ddpm.diffusion import GaussianDiffusion, time_to_step
from registry import ConfigError

SHAPE = (1, 4, 4)


def one_point_data(point: torch.Tensor, n: int = 32) -> TensorDataSource:
    x = point.expand(n, *SHAPE).clone()
    return TensorDataSource({"x": x}, {"x": x}, DataSpec(SHAPE))


class Oracle(torch.nn.Module):
    """The exact epsilon model of the one-point data set at `point` (a zero log-variance fraction when learned)."""

    def __init__(self, diffusion: GaussianDiffusion, point: torch.Tensor):
        super().__init__()
        self.d, self.point = diffusion, point
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        k = time_to_step(t, self.d.num_timesteps)
        eps = self.d.eps_from_xstart(x, k, self.point.expand_as(x))
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if self.d.learned_variance else eps


class Random(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, 3, padding=1)

    def forward(self, x, t, y=None):
        return self.conv(x)


def quantised_point() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (1, *SHAPE), generator=g).float() / 127.5 - 1.0)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_oracle_of_a_one_point_data_set_beats_a_random_model(variance):
    options = {"schedule": "cosine", "steps": 50, "variance": variance, "num_examples": 32, "batch_size": 16}
    metric = registry.build("metric", {"plugin": "ddpm_bpd", **options}, spec=DataSpec(SHAPE), data=None)
    assert isinstance(metric, ModelMetric)
    point = quantised_point()
    data = one_point_data(point)
    torch.manual_seed(0)
    oracle = Oracle(metric.diffusion, point)
    random = Random(2 if variance == "learned_range" else 1)
    good = metric.evaluate(oracle, data, torch.Generator().manual_seed(0))
    bad = metric.evaluate(random, data, torch.Generator().manual_seed(0))
    assert set(good) == {"total", "prior", "decoder", "mse", "xstart_mse"}
    assert good["total"] < bad["total"], (good, bad)
    assert good["xstart_mse"] == pytest.approx(0.0, abs=1e-8) and good["mse"] == pytest.approx(0.0, abs=1e-6)
    assert good["prior"] == pytest.approx(bad["prior"])  # the prior term does not depend on the model
    assert all(math.isfinite(v) for v in (*good.values(), *bad.values()))


def test_kl_terms_are_non_negative_and_vanish_for_the_oracle_with_the_true_variance():
    d = GaussianDiffusion.named("linear", 100, variance="fixed_small")
    point = quantised_point().double()
    x = point.expand(8, *SHAPE)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    random = Random(1).double()
    out = d.calc_bpd_loop(lambda x_t, k: random(x_t, d.model_time(k, x_t)), x, generator=g, clip_denoised=False)
    assert out["vb"].shape == (8, 100) and out["total_bpd"].shape == (8,)
    assert (out["vb"][:, 1:] >= 0).all()  # KL terms
    assert (out["prior_bpd"] >= 0).all()
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    oracle = Oracle(d, point)
    exact = d.calc_bpd_loop(lambda x_t, k: oracle(x_t, d.model_time(k, x_t)), x, generator=g, clip_denoised=False)
    # the oracle's p(x_{k-1} | x_k) is the true posterior: every KL term is zero
    assert exact["vb"][:, 1:].abs().max() < 1e-9
    # what remains is the prior and the decoder: a Gaussian of variance beta~_1 (the clipped log-variance)
    # centred on the exact value, integrated over the value's bin of half-width 1/255
    std = d.tables["posterior_variance"][1].sqrt()
    inner = torch.special.ndtr(1 / 255 / std) - torch.special.ndtr(-1 / 255 / std)
    edge = torch.special.ndtr(1 / 255 / std)
    per_pixel = torch.where(point.abs() > 0.999, edge, inner).log2().neg()
    torch.testing.assert_close(exact["vb"][:, 0], per_pixel.mean().expand(8), rtol=1e-3, atol=0)
    torch.testing.assert_close(exact["total_bpd"], exact["vb"][:, 0] + exact["prior_bpd"])


def test_metric_options_are_validated():
    with pytest.raises(ConfigError, match="respacing"):
        registry.build("metric", {"plugin": "ddpm_bpd", "respacing": "ddim47"}, spec=DataSpec(SHAPE), data=None)
    with pytest.raises(ConfigError, match="continuous"):
        registry.build("metric", {"plugin": "ddpm_bpd"}, spec=DataSpec(SHAPE, kind="discrete", vocab_size=4), data=None)
    with pytest.raises(ConfigError, match="bins"):
        registry.build("metric", {"plugin": "ddpm_bpd", "bins": 1}, spec=DataSpec(SHAPE), data=None)


def test_a_respaced_bound_has_as_many_terms_as_kept_steps():
    metric = registry.build("metric", {"plugin": "ddpm_bpd", "steps": 100, "schedule": "cosine", "respacing": "10",
                                       "num_examples": 4}, spec=DataSpec(SHAPE), data=None)
    assert metric.diffusion.num_timesteps == 10
    calls = []

    class Counting(Random):
        def forward(self, x, t, y=None):
            calls.append(t[0].item())
            return super().forward(x, t, y)

    metric.evaluate(Counting(1), one_point_data(quantised_point()), torch.Generator().manual_seed(0))
    assert len(calls) == 10
