"""The ddpm objective: losses through the registry, label dropout, importance sampling of steps,
its checkpointed history and the history shared across processes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import registry
from core.interfaces import DataSpec
from plugins.ddpm.resample import LossSecondMomentResampler, ScheduleSampler
from registry import ConfigError

SPEC = DataSpec((2, 4), num_classes=3)


def build(path_options=None, **options):
    path = registry.build("path", {"plugin": "gaussian_diffusion", "schedule": "cosine", "steps": 40,
                                   **(path_options or {})}, spec=SPEC)
    return registry.build("objective", {"plugin": "ddpm", **options}, spec=SPEC, path=path), path


class Linear(torch.nn.Module):
    def __init__(self, mult=1):
        super().__init__()
        self.lin = torch.nn.Linear(8 + 1, 8 * mult)
        self.mult = mult

    def forward(self, x, t, y=None):
        h = self.lin(torch.cat([x.reshape(len(x), -1), t[:, None]], dim=1))
        return h.reshape(len(x), 2 * self.mult, 4)


@pytest.mark.parametrize("variance, loss_type, logged", [
    ("fixed_large", "mse", {"mse"}),
    ("learned_range", "mse", {"mse", "vb"}),
    ("learned_range", "rescaled_mse", {"mse", "vb"}),
    ("fixed_small", "kl", set()),
    ("learned", "rescaled_kl", set()),
])
@pytest.mark.parametrize("sampler", ["uniform", "loss-second-moment"])
def test_every_loss_trains(variance, loss_type, logged, sampler):
    torch.manual_seed(0)
    objective, _ = build({"variance": variance}, loss_type=loss_type, schedule_sampler=sampler)
    model = Linear(2 if variance.startswith("learned") else 1)
    batch = {"x": torch.rand(16, 2, 4) * 2 - 1, "y": torch.randint(3, (16,))}
    loss, logs = objective.loss({"model": model}, batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and set(logs) == logged
    loss.backward()
    assert model.lin.weight.grad.abs().sum() > 0


def test_model_is_called_at_the_times_of_the_sampled_steps(monkeypatch):
    objective, _ = build()
    seen = {}

    def model(x, t, y=None):
        seen["t"] = t
        return torch.zeros_like(x)

    torch.manual_seed(0)
    k = torch.randint(40, (32,))
    monkeypatch.setattr(objective.sampler, "sample", lambda b, device, draw=None: (k, torch.ones(b)))
    objective.loss({"model": model}, {"x": torch.zeros(32, 2, 4)}, 0)
    torch.testing.assert_close(seen["t"], (1 - (k + 1) / 40).float())


def test_label_dropout_uses_the_null_label():
    objective, _ = build(label_dropout=1.0)
    seen = {}

    def model(x, t, y=None):
        seen["y"] = y
        return torch.zeros_like(x)

    objective.loss({"model": model}, {"x": torch.zeros(8, 2, 4), "y": torch.zeros(8, dtype=torch.long)}, 0)
    assert (seen["y"] == SPEC.num_classes).all()


def test_importance_weights_multiply_the_loss(monkeypatch):
    objective, _ = build()
    k, w = torch.tensor([0, 5, 39, 20]), torch.tensor([0.5, 1.0, 2.0, 4.0])
    monkeypatch.setattr(objective.sampler, "sample", lambda b, device, draw=None: (k, w))
    x = torch.rand(4, 2, 4)
    torch.manual_seed(0)
    loss, logs = objective.loss({"model": lambda x, t, y=None: torch.zeros_like(x)}, {"x": x}, 0)
    torch.manual_seed(0)
    noise = torch.randn_like(x)  # the objective's draw for epsilon regression
    per_example = noise.pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(loss, (per_example * w).mean())
    assert logs["mse"] == pytest.approx(per_example.mean().item())


def test_objective_needs_the_diffusion_path():
    with pytest.raises(ConfigError, match="gaussian_diffusion"):
        registry.build("objective", {"plugin": "ddpm"}, spec=SPEC, path=None)


# --------------------------------------------------------------------------- loss-second-moment
def test_loss_second_moment_warms_up_then_follows_the_rms_loss():
    T, H = 6, 3
    s = LossSecondMomentResampler(T, history_per_term=H, uniform_prob=0.01)
    assert s.weights() is None  # uniform until every step has H losses
    for rep in range(H):
        s.update_with_all_losses(list(range(T - 1)), [float(k + 1 + rep) for k in range(T - 1)])
    assert not s.warmed_up()
    s.update_with_all_losses([T - 1] * (H + 2), [1.0, 2.0, 3.0, 4.0, 5.0])  # the oldest two are shifted out
    assert s.warmed_up()
    assert s.loss_history[T - 1].tolist() == [3.0, 4.0, 5.0]
    rms = np.sqrt((s.loss_history ** 2).mean(axis=1))
    expected = rms / rms.sum() * 0.99 + 0.01 / T
    np.testing.assert_allclose(s.weights(), expected, rtol=1e-12)
    torch.manual_seed(0)
    k, w = s.sample(20000, "cpu")
    p = expected / expected.sum()
    np.testing.assert_allclose(w.numpy(), 1.0 / (T * p[k.numpy()]), rtol=1e-6)
    freq = np.bincount(k.numpy(), minlength=T) / len(k)
    np.testing.assert_allclose(freq, p, atol=0.015)
    # the weighted mean of any per-step quantity is unbiased for its uniform mean
    f = torch.arange(T, dtype=torch.float64) ** 2
    assert (f[k] * w.double()).mean().item() == pytest.approx(f.mean().item(), rel=0.05)


def test_uniform_sampler_has_unit_weights():
    torch.manual_seed(0)
    k, w = ScheduleSampler(7).sample(1000, "cpu")
    assert k.min() >= 0 and k.max() <= 6 and torch.equal(w, torch.ones(1000))


def test_loss_history_is_checkpointed_as_data():
    objective, _ = build(schedule_sampler="loss-second-moment", history_per_term=2)
    model = Linear()
    torch.manual_seed(0)
    for step in range(5):
        objective.loss({"model": model}, {"x": torch.rand(64, 2, 4)}, step)
    state = objective.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh, _ = build(schedule_sampler="loss-second-moment", history_per_term=2)
    fresh.load_state_dict(loaded)
    np.testing.assert_array_equal(fresh.sampler.loss_history, objective.sampler.loss_history)
    np.testing.assert_array_equal(fresh.sampler.loss_counts, objective.sampler.loss_counts)
    assert objective.sampler.loss_counts.sum() > 0
    wrong, _ = build(schedule_sampler="loss-second-moment", history_per_term=3)
    with pytest.raises(ConfigError, match="loss history"):
        wrong.load_state_dict(loaded)


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = LossSecondMomentResampler(5, history_per_term=4)
        # ragged batches: rank r contributes r + 2 losses at steps r, r+1, ...
        k = torch.tensor([(rank + i) % 5 for i in range(rank + 2)])
        losses = torch.tensor([10.0 * rank + i for i in range(rank + 2)])
        s.update_with_local_losses(k, losses)
        np.save(os.path.join(out_dir, f"hist{rank}.npy"), s.loss_history)
        np.save(os.path.join(out_dir, f"count{rank}.npy"), s.loss_counts)
    finally:
        torch.distributed.destroy_process_group()


def test_loss_history_is_shared_across_processes(tmp_path):
    world = 2
    mp.start_processes(_gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    expected = LossSecondMomentResampler(5, history_per_term=4)
    for rank in range(world):  # every rank applies all ranks' losses, in rank order
        expected.update_with_all_losses([(rank + i) % 5 for i in range(rank + 2)],
                                        [10.0 * rank + i for i in range(rank + 2)])
    for rank in range(world):
        np.testing.assert_array_equal(np.load(tmp_path / f"hist{rank}.npy"), expected.loss_history)
        np.testing.assert_array_equal(np.load(tmp_path / f"count{rank}.npy"), expected.loss_counts)
