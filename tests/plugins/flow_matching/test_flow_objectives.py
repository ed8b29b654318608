"""Flow-matching objectives: prediction targets, loss weightings, time samplers, binned losses, couplings,
label dropout, and the sampling field for epsilon / x1 models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.interfaces import Binned, DataSpec
from core.testing.strategies import seeds
from core.trainer import accumulate_logs, read_logs
from plugins.flow_matching.analytic import GaussianFlow
from plugins.flow_matching.objective import FlowMatchingConfig, loss_weights, sample_times
from plugins.flow_matching.path import AffinePath

from .test_flow_schedulers import schedulers

SPEC = DataSpec(shape=(3,))


def objective(scheduler_mapping=None, spec=SPEC, **options):
    scheduler = registry.build("scheduler", scheduler_mapping or {"plugin": "cond_ot"})
    path = registry.build("path", {"plugin": "affine"}, scheduler=scheduler)
    return registry.build("objective", {"plugin": "flow_matching", **options}, spec=spec, scheduler=scheduler,
                          path=path)


class Linear(torch.nn.Module):
    def __init__(self, dim=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim + 1, dim, generator=g, dtype=torch.float64))

    def forward(self, x, t, y=None):
        return torch.cat([x, t[:, None].to(x.dtype)], 1) @ self.w


def _draw(seed, n=64, dim=3):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, dim, generator=g, dtype=torch.float64),
            "x0": torch.randn(n, dim, generator=g, dtype=torch.float64)}


def _times(obj, n, seed):
    torch.manual_seed(seed)
    return sample_times(obj.config, n, "cpu", scheduler=obj.scheduler, dtype=torch.float64)


def test_velocity_mse_keeps_its_name_options_and_loss():
    """The older name: same options, and the plain rectified-flow loss on cond_ot."""
    obj = registry.build("objective", {"plugin": "velocity_mse", "time_sampler": "logit_normal", "mean": 0.5,
                                       "std": 0.8, "label_dropout": 0.1},
                         spec=SPEC, path=AffinePath(registry.build("scheduler", {"plugin": "cond_ot"})))
    batch = {"x": torch.randn(32, 3)}
    model = Linear().float()
    torch.manual_seed(3)
    loss, logs = obj.loss({"model": model}, batch, 0)
    torch.manual_seed(3)
    x0 = torch.randn_like(batch["x"])
    t = torch.sigmoid(0.5 + 0.8 * torch.randn(32))
    xt = t[:, None] * batch["x"] + (1 - t[:, None]) * x0
    expected = (model(xt, t) - (batch["x"] - x0)).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(logs) == {"loss_bin"} and logs["loss_bin"].bins == 4


@settings(max_examples=30, deadline=None)
@given(scheduler=schedulers(), seed=seeds(), prediction=st.sampled_from(["velocity", "epsilon", "x1"]))
def test_velocity_weighting_equals_the_velocity_mse_of_the_converted_prediction(scheduler, seed, prediction):
    path = AffinePath(scheduler)
    obj = registry.build("objective", {"plugin": "flow_matching", "prediction": prediction,
                                       "loss_weighting": "velocity", "max_weight": 1e12,
                                       "time_sampler": "logit_normal"}, spec=SPEC, path=path)
    batch, model = _draw(seed), Linear(seed=seed)
    torch.manual_seed(seed)
    loss, _ = obj.loss({"model": model}, batch, 0)
    t = _times(obj, 64, seed).double()
    ps = path.sample(batch["x0"], batch["x"], t)
    v = path.convert(model(ps.x_t, t), ps.x_t, t, prediction, "velocity")
    expected = (v - ps.target).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(scheduler=schedulers(), seed=seeds(), prediction=st.sampled_from(["velocity", "epsilon", "x1"]),
       gamma=st.floats(0.5, 20.0))
def test_min_snr_weighting_is_min_snr_gamma_in_x1_space(scheduler, seed, prediction, gamma):
    path = AffinePath(scheduler)
    obj = registry.build("objective", {"plugin": "flow_matching", "prediction": prediction,
                                       "loss_weighting": "min_snr", "min_snr_gamma": gamma}, spec=SPEC, path=path)
    batch, model = _draw(seed), Linear(seed=seed)
    torch.manual_seed(seed)
    loss, _ = obj.loss({"model": model}, batch, 0)
    t = _times(obj, 64, seed).double()
    ps = path.sample(batch["x0"], batch["x"], t)
    x1_hat = path.convert(model(ps.x_t, t), ps.x_t, t, prediction, "x1")
    s = scheduler(t)
    snr = (s.alpha_t / s.sigma_t) ** 2
    expected = (torch.clamp(snr, max=gamma) * (x1_hat - batch["x"]).pow(2).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_weights_are_finite_at_the_ends():
    path = AffinePath(registry.build("scheduler", {"plugin": "cond_ot"}))
    t = torch.tensor([0.0, 0.5, 1.0])
    for kind in ("none", "velocity", "min_snr"):
        for prediction in ("velocity", "epsilon", "x1"):
            w = loss_weights(kind, prediction, path, t)
            assert torch.isfinite(w).all() and (w >= 0).all(), (kind, prediction, w)


@pytest.mark.parametrize("prediction", ["epsilon", "x1"])
def test_targets_of_epsilon_and_x1_predictions(prediction):
    obj = objective(prediction=prediction)
    batch, model = _draw(0), Linear()
    torch.manual_seed(0)
    loss, _ = obj.loss({"model": model}, batch, 0)
    t = _times(obj, 64, 0).double()
    xt = t[:, None] * batch["x"] + (1 - t[:, None]) * batch["x0"]
    target = batch["x0"] if prediction == "epsilon" else batch["x"]
    assert loss.item() == pytest.approx((model(xt, t) - target).pow(2).mean().item(), rel=1e-6)


def test_couplings_from_the_batch_are_used_as_the_source():
    obj = objective()
    batch, model = _draw(1), Linear()
    losses = []
    for x0 in (batch["x0"], -batch["x0"]):
        torch.manual_seed(0)
        losses.append(obj.loss({"model": model}, {"x": batch["x"], "x0": x0}, 0)[0].item())
    assert losses[0] != losses[1]
    torch.manual_seed(0)
    t = _times(obj, 64, 0).double()
    xt = t[:, None] * batch["x"] + (1 - t[:, None]) * batch["x0"]
    assert losses[0] == pytest.approx((model(xt, t) - (batch["x"] - batch["x0"])).pow(2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("bins", [4, 10])
def test_loss_by_time_bin(bins):
    obj = objective(loss_bins=bins, time_sampler="uniform")

    class TimeError(torch.nn.Module):  # error grows with t: the per-bin losses increase
        def forward(self, x, t, y=None):
            return (x - torch.zeros_like(x)) * 0 + 10 * t[:, None]

    batch = {"x": torch.zeros(4000, 3), "x0": torch.zeros(4000, 3)}
    torch.manual_seed(0)
    _, logs = obj.loss({"model": TimeError()}, batch, 0)
    assert list(logs) == ["loss_bin"] and isinstance(logs["loss_bin"], Binned)  # logged as loss_bin/0 ... /bins-1
    assert logs["loss_bin"].bins == bins and logs["loss_bin"].values.shape == logs["loss_bin"].positions.shape == (4000,)
    sums, counts = logs["loss_bin"].totals()
    assert sums.shape == counts.shape == (bins,) and int(counts.sum()) == 4000
    values = (sums / counts).tolist()
    assert values == sorted(values)
    for k, v in enumerate(values):  # E[(10 t)^2 | t in bin k] = 100 (a^2 + ab + b^2) / 3
        a, b = k / bins, (k + 1) / bins
        assert v == pytest.approx(100 * (a * a + a * b + b * b) / 3, rel=0.1)
    # the per-example values are the loss of each example at its time: (10 t)^2 summed over 3 dims / 3
    assert torch.allclose(logs["loss_bin"].values, 100 * logs["loss_bin"].positions ** 2, rtol=1e-5)
    # over a log interval the trainer bins every example of every step together; an empty bin is left out
    sums_of = {}
    torch.manual_seed(0)
    _, small = obj.loss({"model": TimeError()}, {"x": torch.zeros(1, 3), "x0": torch.zeros(1, 3)}, 1)
    accumulate_logs(sums_of, small, 0.5)
    ((key, value),) = read_logs(sums_of, steps=1).items()
    t = float(small["loss_bin"].positions[0])
    assert key == f"loss_bin/{min(int(t * bins), bins - 1)}" and value == pytest.approx(100 * t * t, rel=1e-5)
    assert objective(loss_bins=0).loss({"model": TimeError()}, batch, 0)[1] == {}


def test_time_samplers():
    n = 200_000
    cfg = FlowMatchingConfig
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal", "log_normal", "mode"):
        t = sample_times(cfg(time_sampler=kind), n, generator=g)
        assert t.shape == (n,) and (t >= 0).all() and (t <= 1).all(), kind
    t = sample_times(cfg(time_sampler="logit_normal", mean=0.7, std=0.5), n, generator=g)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.7, abs=0.01) and logit.std().item() == pytest.approx(0.5, abs=0.01)
    # EDM: ln(sigma) ~ N(p_mean, p_std) with sigma = (1 - t) / t under cond_ot
    from plugins.flow_matching.scheduler import CondOTScheduler, CosineScheduler

    t = sample_times(cfg(time_sampler="log_normal", p_mean=-1.2, p_std=1.2), n, scheduler=CondOTScheduler(),
                     generator=g, dtype=torch.float64)
    ln_sigma = torch.log((1 - t) / t)
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.02) and ln_sigma.std().item() == pytest.approx(1.2, abs=0.02)
    t = sample_times(cfg(time_sampler="log_normal"), n, scheduler=CosineScheduler(), generator=g, dtype=torch.float64)
    ln_sigma = torch.log(1 / torch.tan(0.5 * math.pi * t))
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)
    # mode sampling: s = 0 is uniform; s > 0 concentrates mid times; the density follows SD3's formula
    t = sample_times(cfg(time_sampler="mode", mode_scale=0.0), n, generator=g)
    assert torch.histc(t, 10, 0, 1).div(n).sub(0.1).abs().max().item() < 0.005
    t = sample_times(cfg(time_sampler="mode", mode_scale=1.29), n, generator=g)
    assert ((t > 0.25) & (t < 0.75)).float().mean().item() > 0.6
    torch.manual_seed(5)
    u = torch.rand(1)
    torch.manual_seed(5)
    got = sample_times(cfg(time_sampler="mode"), 1)
    assert got.item() == pytest.approx(1 - (1 - u.item() - 1.29 * (math.cos(0.5 * math.pi * u.item()) ** 2 - 1 + u.item())),
                                       abs=1e-6)


def test_config_validation():
    with pytest.raises(registry.ConfigError, match="mode_scale"):
        FlowMatchingConfig(mode_scale=2.0)
    with pytest.raises(registry.ConfigError, match="label_dropout"):
        FlowMatchingConfig(label_dropout=1.5)
    with pytest.raises(registry.ConfigError, match="prediction"):
        registry.build("objective", {"plugin": "flow_matching", "prediction": "epsilon"}, spec=SPEC,
                       path=object())
    with pytest.raises(registry.ConfigError, match="needs a \\[path\\]"):
        registry.build("objective", {"plugin": "flow_matching"}, spec=SPEC)


def test_label_dropout():
    spec = DataSpec(shape=(3,), num_classes=5)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, y=None):
            seen.append(y.clone())
            return x

    batch = {"x": torch.randn(2000, 3), "y": torch.randint(0, 5, (2000,))}
    for p, lo, hi in ((0.0, 0.0, 0.0), (0.3, 0.25, 0.35), (1.0, 1.0, 1.0)):
        objective(spec=spec, label_dropout=p).loss({"model": Spy()}, batch, 0)
        dropped = (seen[-1] == 5).float().mean().item()
        assert lo <= dropped <= hi
        kept = seen[-1] != 5
        assert torch.equal(seen[-1][kept], batch["y"][kept])


@pytest.mark.parametrize("prediction", ["epsilon", "x1"])
def test_sampling_model_turns_predictions_into_the_velocity(prediction):
    from plugins.flow_matching.scheduler import CosineScheduler

    scheduler = CosineScheduler()
    obj = objective({"plugin": "cosine"}, spec=DataSpec(shape=(2,)), prediction=prediction, sampling_eps=1e-3)
    mean, cov = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    model = GaussianFlow(mean, cov, scheduler, prediction)
    truth = GaussianFlow(mean, cov, scheduler, "velocity")
    field = obj.sampling_model(model)
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    assert torch.allclose(field(x, t), truth(x, t), atol=1e-10)
    # at the singular end the model is evaluated eps away, so the field stays finite
    end = torch.full((6,), 0.0 if prediction == "epsilon" else 1.0, dtype=torch.float64)
    assert torch.isfinite(field(x, end)).all()
    assert objective().sampling_model(model) is model
