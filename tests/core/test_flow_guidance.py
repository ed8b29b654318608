"""Classifier-free guidance (core/guidance.py) as used by flow-matching sampling:
scale 0 is the conditional model, otherwise (1 + w) cond - w uncond, evaluated as one batch of 2B."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.generate import Components, generate
from core.guidance import ClassifierFreeGuidance, guided
from core.interfaces import DataSpec
from core.testing.strategies import batch_sizes, data_shapes, seeds


class LabelShift(torch.nn.Module):
    """``f(x, t, y) = x * (1 + t) + embed(y)``: conditional and unconditional outputs differ. Counts calls."""

    def __init__(self, shape, num_classes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(num_classes + 1, *shape, generator=g, dtype=torch.float64)
        self.calls, self.batches = 0, []

    def forward(self, x, t, y=None):
        self.calls += 1
        self.batches.append(x.shape[0])
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        return x * (1 + tt) + self.embed[y]


@settings(max_examples=40, deadline=None)
@given(shape=data_shapes(), batch=batch_sizes(), seed=seeds(), num_classes=st.integers(1, 6),
       w=st.floats(-1.0, 10.0, allow_nan=False))
def test_guidance_is_the_documented_combination(shape, batch, seed, num_classes, w):
    model = LabelShift(shape, num_classes, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    y = torch.randint(num_classes, (batch,), generator=g)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, num_classes))
    model.calls, model.batches = 0, []
    out = ClassifierFreeGuidance(model, w, num_classes)(x, t, y)
    if w == 0.0:
        assert torch.equal(out, cond) and model.batches == [batch]
    else:
        assert torch.allclose(out, (1 + w) * cond - w * uncond, rtol=1e-12, atol=1e-12)
        assert model.batches == [2 * batch]  # one evaluation of 2B


def test_scale_zero_and_unconditional_data_return_the_model_itself():
    model = LabelShift((2,), 3)
    assert guided(model, 0.0, 3) is model
    assert guided(model, 2.0, 0) is model
    assert isinstance(guided(model, 2.0, 3), ClassifierFreeGuidance)
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    assert torch.equal(ClassifierFreeGuidance(model, 1.5, 3)(x, t, None), model(x, t, None))


def test_guided_generation_integrates_the_guided_velocity():
    """generate() with guidance scale w equals integrating (1 + w) u(x|y) - w u(x|null) with the same solver."""
    spec = DataSpec(shape=(2,), num_classes=3)
    scheduler = registry.build("scheduler", {"plugin": "cond_ot"})
    path = registry.build("path", {"plugin": "affine"}, scheduler=scheduler)
    objective = registry.build("objective", {"plugin": "velocity_mse"}, spec=spec, path=path)
    solver = registry.build("solver", {"plugin": "ode", "method": "heun", "steps": 8}, scheduler=scheduler)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = LabelShift((2,), 3).float()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            return self.inner.embed.float()[y] - x * (1 + t[:, None])

    comps = Components(spec=spec, data=None, model=Net(), objective=objective, scheduler=scheduler, path=path,
                       solver=solver)
    labels = torch.tensor([0, 1, 2, 1])
    out, nfe = generate(comps, comps.model, 4, torch.Generator().manual_seed(0), labels=labels, guidance_scale=2.0)
    g = torch.Generator().manual_seed(0)
    x0 = path.sample_source((4, 2), generator=g)
    manual = solver.sample(ClassifierFreeGuidance(comps.model, 2.0, 3), x0, y=labels).x
    assert torch.allclose(out["x"], manual) and nfe == 16
    plain, _ = generate(comps, comps.model, 4, torch.Generator().manual_seed(0), labels=labels, guidance_scale=0.0)
    assert not torch.allclose(plain["x"], out["x"])
