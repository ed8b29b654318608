"""The small presets of the `unet` and `dit` backbones learn: a few rectified-flow steps on the 8x8 digits
lower the loss, for continuous pixels and (cross-entropy of the clean tokens under a uniform-noise mixture path) for discrete ones."""

from __future__ import annotations

import pytest
import torch

import registry

STEPS, BATCH, WINDOW = 40, 32, 10


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses_over_training(plugin: str, options: dict, form: str) -> list[float]:
    torch.manual_seed(0)
    data = registry.build("data", {"plugin": "digits", "form": form})
    model = registry.build("backbone", {"plugin": plugin, **options}, spec=data.spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batches = data.train_batches(BATCH, seed=0)
    losses = []
    for _ in range(STEPS):
        batch = next(batches)
        x_1, y = batch["x"], batch["y"]
        t = torch.rand(len(x_1))
        if form == "continuous":
            # straight path x_t = t x_1 + (1 - t) x_0, velocity target x_1 - x_0
            x_0 = torch.randn_like(x_1)
            x_t = t[:, None, None, None] * x_1 + (1 - t[:, None, None, None]) * x_0
            loss = (model(x_t, t, y) - (x_1 - x_0)).square().mean()
        else:
            # uniform-noise mixture path: each token kept with probability t, else a uniformly random level
            keep = torch.rand(x_1.shape) < t[:, None, None, None]
            x_t = torch.where(keep, x_1, torch.randint_like(x_1, data.spec.vocab_size))
            logits = model(x_t, t, y)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x_1.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("plugin,options", [
    ("unet", {"preset": "digits"}),
    ("dit", {"preset": "DiT-digits"}),
])
@pytest.mark.parametrize("form", ["continuous", "discrete"])
def test_small_presets_train_on_digits(plugin, options, form):
    losses = losses_over_training(plugin, options, form)
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.8 * first, (first, last)
    print(f"{plugin} {form}: mean loss of the first {WINDOW} steps {first:.4f}, of the last {WINDOW} {last:.4f}")
