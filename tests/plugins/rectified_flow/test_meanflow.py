"""MeanFlow (plugins.rectified_flow.objective.py) against closed forms written here from the paper's equations.

Reference case: x_0 ~ N(0, I) to x_1 ~ N(m, diag(s^2)) on the linear path x_t = t x_1 + (1 - t) x_0
(flowforge's time: noise at 0). The marginal x_t ~ N(t m, sigma_t^2), sigma_t^2 = t^2 s^2 + (1 - t)^2, and
the flow is the affine map z_t = t m + sigma_t xi, xi = x_0, so, for r > t,

    phi_{t -> r}(z) = r m + (sigma_r / sigma_t) (z - t m),     u(z, t, r) = (phi_{t -> r}(z) - z) / (r - t),
    v(z, t) = m + (sigma_t' / sigma_t) (z - t m),              sigma_t' = (t s^2 - (1 - t)) / sigma_t.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import registry
from core.interfaces import DataSpec
from core.rng import GlobalRandom
from plugins.rectified_flow.objective import adaptive_loss, meanflow_target

D = torch.float64
M = torch.tensor([1.5, -0.5], dtype=D)
S = torch.tensor([0.3, 2.0], dtype=D)
SPEC = DataSpec(shape=(2,))


def sigma(t):
    return torch.sqrt(t ** 2 * S ** 2 + (1 - t) ** 2)


def flow(z, t, r):
    """phi_{t -> r}(z); z (B, 2), t, r (B,)."""
    t, r = t[:, None], r[:, None]
    return r * M + sigma(r) / sigma(t) * (z - t * M)


def u_exact(z, t, r):
    return (flow(z, t, r) - z) / (r - t)[:, None]


def v_exact(z, t):
    tc = t[:, None]
    return M + (tc * S ** 2 - (1 - tc)) / sigma(tc) ** 2 * (z - tc * M)


def draws(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, 2, generator=g, dtype=D)
    t = 0.9 * torch.rand(n, generator=g, dtype=D)
    r = t + (1 - t) * torch.rand(n, generator=g, dtype=D).clamp(min=1e-3)
    return z, t, r


def test_closed_form_average_velocity_is_the_integral_of_the_velocity():
    """The reference itself: (r - t) u(z, t, r) is the displacement of an RK4 solution of dz/dt = v."""
    z, t, r = draws(8)
    x, steps = z.clone(), 400
    h = (r - t)[:, None] / steps
    tau = t.clone()
    for _ in range(steps):
        k1 = v_exact(x, tau)
        k2 = v_exact(x + h / 2 * k1, tau + h[:, 0] / 2)
        k3 = v_exact(x + h / 2 * k2, tau + h[:, 0] / 2)
        k4 = v_exact(x + h * k3, tau + h[:, 0])
        x, tau = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tau + h[:, 0]
    assert torch.allclose(x, flow(z, t, r), atol=1e-10)
    assert torch.allclose(u_exact(z, t, t + 1e-7), v_exact(z, t), atol=1e-5)


def test_meanflow_identity_holds_for_the_exact_average_velocity():
    """With the exact u and the marginal v, the JVP target v + (r - t) du/dt is u itself (float64)."""
    z, t, r = draws()
    pred, target = meanflow_target(u_exact, z, t, r, v_exact(z, t))
    assert torch.allclose(pred, u_exact(z, t, r), atol=1e-14)
    assert torch.allclose(target, u_exact(z, t, r), atol=1e-10)
    # and a wrong u (the instantaneous velocity at t, used as if it were the average) is not a fixed point
    _, wrong = meanflow_target(lambda z_, t_, r_: v_exact(z_, t_), z, t, r, v_exact(z, t))
    assert (wrong - v_exact(z, t)).abs().max() > 1e-2


class SmoothNet(nn.Module):
    """A float64 tanh network of (z, t, r), written here, whose derivatives finite differences can check."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(4, 32, generator=g, dtype=D))
        self.w2 = nn.Parameter(torch.randn(32, 2, generator=g, dtype=D) / 6)

    def forward(self, z, t, y=None, r=None):
        r = t if r is None else r
        return torch.tanh(torch.cat([z, t[:, None], r[:, None]], 1) @ self.w1) @ self.w2


def test_jvp_target_equals_a_finite_difference_target():
    net = SmoothNet()
    z, t, r = draws(32, seed=1)
    v = torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=D)
    u = lambda z_, t_, r_: net(z_, t_, r=r_)  # noqa: E731
    _, target = meanflow_target(u, z, t, r, v)
    h = 1e-5
    du_dt = (u(z + h * v, t + h, r) - u(z - h * v, t - h, r)) / (2 * h)
    assert torch.allclose(target, v + (r - t)[:, None] * du_dt, atol=1e-8)
    _, at_zero = meanflow_target(u, z, t, t, v)  # r = t: the flow-matching target v
    assert torch.equal(at_zero, v)


def test_adaptive_loss_is_the_stop_gradient_weighted_squared_norm():
    delta = torch.randn(16, 3, 2, dtype=D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    sq = delta.detach().pow(2).sum((1, 2))
    loss = adaptive_loss(delta, 1.0, 1e-3)
    assert torch.allclose(loss, (sq / (sq + 1e-3)).mean())
    loss.backward()  # sg(w): the gradient is w * d||delta||^2 = 2 w delta / B
    assert torch.allclose(delta.grad, 2 * delta.detach() / (sq + 1e-3)[:, None, None] / 16)
    assert torch.allclose(adaptive_loss(delta.detach(), 0.0, 1e-3), sq.mean())
    assert torch.allclose(adaptive_loss(delta.detach(), 0.5, 1e-2), (sq / (sq + 1e-2).sqrt()).mean())


def path():
    return registry.build("path", {"plugin": "affine"}, scheduler=registry.build("scheduler", {"plugin": "cond_ot"}))


def test_objective_with_r_equal_t_is_flow_matching():
    """ratio = 0, p = 0: the loss is the flow-matching loss mean ||u(x_t, t, t) - (x_1 - x_0)||^2 of the same draws."""
    net = SmoothNet()
    obj = registry.build("objective", {"plugin": "meanflow", "ratio": 0.0, "weight_power": 0.0,
                                       "time_sampler": "uniform"}, spec=SPEC, path=path())
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(64, 2, generator=g, dtype=D), torch.randn(64, 2, generator=g, dtype=D)
    torch.manual_seed(7)
    loss, logs = obj.loss({"model": net}, {"x": x1, "x0": x0}, 0)
    assert float(logs["interval_fraction"]) == 0.0
    torch.manual_seed(7)  # the same times, drawn again from torch's global RNG (a batch without seeds)
    t, _ = obj.times(64, GlobalRandom(64), None, D)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    reference = (net(xt, t) - (x1 - x0)).pow(2).sum(1).mean()
    assert torch.allclose(loss, reference, atol=1e-12)


def test_time_sampling_ratio_and_order():
    obj = registry.build("objective", {"plugin": "meanflow"}, spec=SPEC, path=path())
    t, r = obj.times(20000, GlobalRandom(20000, torch.Generator().manual_seed(0)), None, D)
    assert bool(((0 < t) & (t <= r) & (r < 1)).all())
    assert abs(float((r > t).double().mean()) - 0.25) < 0.01
    # logit-normal(0.4, 1) in flowforge's time (the paper's lognorm(-0.4, 1) in its reversed time)
    both = torch.cat([t[r > t], r[r > t]])
    assert abs(float(torch.logit(both).mean()) - 0.4) < 0.05


def test_solver_with_the_exact_average_velocity_is_exact_in_one_step():
    x0 = torch.randn(50, 2, dtype=D, generator=torch.Generator().manual_seed(2))
    calls = []

    def field(x, t, y=None, r=None):
        calls.append((t.clone(), r.clone()))
        return u_exact(x, t, r)

    for k in (1, 2, 4):
        calls.clear()
        out = registry.build("solver", {"plugin": "meanflow", "steps": k}).sample(field, x0, intermediates=True)
        assert out.nfe == k == len(calls) and out.trajectory.shape == (k + 1, 50, 2)
        assert torch.allclose(out.x, M + S * x0, atol=1e-12)  # phi_{0 -> 1}(x_0) = m + s x_0
        assert torch.allclose(out.times, torch.linspace(0, 1, k + 1, dtype=D))
        assert all(torch.allclose(r - t, torch.full_like(t, 1 / k)) for t, r in calls)


def test_mlp_interval_input():
    plain = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 1}, spec=SPEC)
    two = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 1, "interval_input": True}, spec=SPEC)
    x, t = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(two(x, t), two(x, t, r=t))  # r = None is r = t
    assert not torch.allclose(two(x, t, r=t + 0.5), two(x, t))
    with pytest.raises(ValueError, match="interval_input"):
        plain(x, t, r=t)
    with pytest.raises(registry.ConfigError, match="ratio"):
        registry.build("objective", {"plugin": "meanflow", "ratio": 1.5}, spec=SPEC, path=path())
    with pytest.raises(registry.ConfigError, match="steps"):
        registry.build("solver", {"plugin": "meanflow", "steps": 0})


@pytest.mark.slow
def test_meanflow_one_step_beats_one_step_euler_of_a_flow_of_equal_budget(tmp_path):
    """The experiments, shortened: same data, network size, steps and batch. One MeanFlow jump lands near the
    checkerboard; one euler step of the 1-RF lands near the data mean. MeanFlow with the paper's ImageNet
    times (the objective's defaults), which learn faster at this small budget than the file's (uniform, 0.75:
    0.130 here)."""
    from pathlib import Path

    from core.run import run

    root = Path(__file__).resolve().parents[3] / "experiments"
    budget = ["trainer.steps=600", "trainer.batch_size=256", "trainer.checkpoint_every=0", 'trainer.progress="off"',
              "eval.num_samples=1000", "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false",
              "backbone.hidden=64", "backbone.depth=2"]  # seed 0: 1-RF 0.285, MeanFlow 0.050
    one = '{plugin="few_step",name="one",num_samples=1000,SOLVER}'
    rf = run(root / "rectified_flow_2d.toml", [*budget, "metrics=[" + one.replace("SOLVER", 'method="euler"') + "]"],
             out=tmp_path / "rf")
    mf = run(root / "meanflow_2d.toml",
             [*budget, "trainer.lr=3e-3", 'objective.time_sampler="logit_normal"', "objective.ratio=0.25",
              "metrics=[" + one.replace("SOLVER", 'solver={plugin="meanflow",steps=1}') + "]"],
             out=tmp_path / "mf")
    a, b = rf["metrics"]["one/energy_distance"], mf["metrics"]["one/energy_distance"]
    assert mf["metrics"]["one/nfe"] == rf["metrics"]["one/nfe"] == 1.0
    assert b < 0.25 * a, (a, b)


def test_few_step_metric_samples_with_a_solver_table():
    """few_step's solver = {plugin = "meanflow", steps = k}: the exact average velocity gives the data's law."""
    from core.data import TensorDataSource

    class Exact(nn.Module):
        def forward(self, x, t, y=None, r=None):
            return u_exact(x.double(), t.double(), r.double()).to(x.dtype)

    held = {"x": (M + S * torch.randn(2000, 2, dtype=D, generator=torch.Generator().manual_seed(4))).float()}
    data = TensorDataSource(held, held, SPEC)
    metric = registry.build("metric", {"plugin": "few_step", "num_samples": 2000, "solver": {"plugin": "meanflow",
                                       "steps": 2}}, spec=SPEC, data=data)
    out = metric.evaluate(Exact(), data, torch.Generator().manual_seed(1))
    assert out["nfe"] == 2.0 and out["energy_distance"] < 0.01
    with pytest.raises(registry.ConfigError, match="solver"):
        registry.build("metric", {"plugin": "few_step", "solver": {"steps": 2}}, spec=SPEC, data=data)
    with pytest.raises(registry.ConfigError, match="solver.*steps"):
        registry.build("metric", {"plugin": "few_step", "solver": {"plugin": "meanflow", "steps": 0}}, spec=SPEC,
                       data=data)
