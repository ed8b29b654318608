"""The fast code paths (fused AdamW, torch.compile, channels-last, bf16 autocast) give the plain paths' results."""

from __future__ import annotations

import pytest
import torch

from core import checkpoint as ckpt
from core.run import run

from .conftest import RF2D

DIGITS = ["data={plugin='digits'}", "trainer.batch_size=64", "eval.num_samples=32", "eval.num_pictures=8",
          "eval.batch_size=32", "backbone.hidden=32", "backbone.depth=2", "solver.steps=2", "trainer.steps=4",
          "trainer.log_every=2", "eval.untrained=false", "eval.floor=false", "metrics=[]"]


def params(out):
    return ckpt.load(ckpt.latest(out / "checkpoints"))["model"]


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol)


def test_fused_adamw_matches_foreach(tmp_path):
    run(RF2D, [*DIGITS, "trainer.fused='off'"], out=tmp_path / "plain")
    run(RF2D, [*DIGITS, "trainer.fused='on'"], out=tmp_path / "fused")
    assert_close(params(tmp_path / "plain"), params(tmp_path / "fused"))


def test_channels_last_matches_contiguous(tmp_path):
    run(RF2D, DIGITS, out=tmp_path / "plain")
    run(RF2D, [*DIGITS, "trainer.channels_last=true"], out=tmp_path / "cl")
    assert_close(params(tmp_path / "plain"), params(tmp_path / "cl"))


def test_torch_compile_matches_eager(tmp_path):
    run(RF2D, [*DIGITS, "trainer.steps=2"], out=tmp_path / "eager")
    run(RF2D, [*DIGITS, "trainer.steps=2", "trainer.compile=true"], out=tmp_path / "compiled")
    assert_close(params(tmp_path / "eager"), params(tmp_path / "compiled"), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_forward_is_close_to_fp32():
    import registry

    spec = registry.build("data", {"plugin": "toy2d"}).spec
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 64, "depth": 2}, spec=spec)
    x, t = torch.randn(16, 2), torch.rand(16)
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).norm() / ref.norm() < 3e-2


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_compiled_sampling_step_matches_the_eager_loop(method):
    """ode's ``compile = true`` (one torch.compile graph per step, replayed over the grid) gives the eager
    loop's samples, trajectory and evaluation count on a non-uniform grid, and one graph serves every step."""
    import registry

    spec = registry.build("data", {"plugin": "toy2d"}).spec
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 32, "depth": 2}, spec=spec).eval()
    x0 = torch.randn(8, 2)
    times = [0.0, 0.1, 0.35, 0.5, 0.8, 1.0]
    eager = registry.build("solver", {"plugin": "ode", "method": method, "times": times})
    fast = registry.build("solver", {"plugin": "ode", "method": method, "times": times, "compile": True})
    a, b = eager.sample(model, x0, intermediates=True), fast.sample(model, x0, intermediates=True)
    assert a.nfe == b.nfe
    torch.testing.assert_close(b.trajectory, a.trajectory, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.times, a.times)
    (step,) = fast._compiled.values()
    fast.sample(model, torch.randn(8, 2))  # new values, same shapes: no recompilation
    assert len(fast._compiled) == 1 and fast._compiled[(id(model), method)] is step


def test_compile_is_refused_for_adaptive_methods():
    import registry
    from registry import ConfigError

    with pytest.raises(ConfigError, match="compile"):
        registry.build("solver", {"plugin": "ode", "method": "dopri5", "compile": True})
