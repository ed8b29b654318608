"""The fast code paths (fused AdamW, torch.compile, channels-last, bf16 autocast) give the plain paths' results."""

from __future__ import annotations

import pytest
import torch

from core import checkpoint as ckpt
from core.run import run

from ..conftest import RF2D

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


@pytest.mark.parametrize("flag", ["compile", "cuda_graph"])
def test_compile_and_graphs_are_refused_for_adaptive_methods(flag):
    import registry
    from registry import ConfigError

    with pytest.raises(ConfigError, match=flag):
        registry.build("solver", {"plugin": "ode", "method": "dopri5", flag: True})


def test_cuda_graph_flag_integrates_cpu_inputs_as_usual():
    """``cuda_graph = true`` is a no-op for CPU tensors (an experiment's config runs on either device)."""
    import registry

    spec = registry.build("data", {"plugin": "toy2d"}).spec
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 32, "depth": 2}, spec=spec).eval()
    x0 = torch.randn(8, 2)
    plain = registry.build("solver", {"plugin": "ode", "method": "heun", "steps": 5})
    graphed = registry.build("solver", {"plugin": "ode", "method": "heun", "steps": 5, "cuda_graph": True})
    torch.testing.assert_close(graphed.sample(model, x0).x, plain.sample(model, x0).x, rtol=0, atol=0)
    assert graphed._graphed is None


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_replay_matches_the_eager_loop(compiled):
    """The captured integration replays the eager loop's result for new inputs, sees in-place parameter
    updates (an EMA step), and is captured again for a new batch shape."""
    import registry

    spec = registry.build("data", {"plugin": "toy2d"}).spec
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 32, "depth": 2}, spec=spec).cuda().eval()
    times = [0.0, 0.1, 0.35, 0.5, 0.8, 1.0]
    eager = registry.build("solver", {"plugin": "ode", "method": "rk4", "times": times})
    graphed = registry.build("solver", {"plugin": "ode", "method": "rk4", "times": times, "cuda_graph": True,
                                        "compile": compiled})
    for batch in (16, 16, 32):
        x0 = torch.randn(batch, 2, device="cuda")
        a, b = eager.sample(model, x0, intermediates=True), graphed.sample(model, x0, intermediates=True)
        torch.testing.assert_close(b.trajectory, a.trajectory, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)  # in place, as an EMA update
    assert graphed._graphed[0][5] == (32, 2)


def _stream(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"corrupt file at batch {i}")
        yield {"x": torch.full((4, 3), float(i)), "y": torch.arange(4) + i}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_device_prefetch_yields_the_stream_in_order_on_the_device(device):
    """The prefetching thread changes where and when batches are made, never which or in what order."""
    from core.data import device_prefetch

    got = list(device_prefetch(_stream(7), device, depth=2))
    assert len(got) == 7
    for i, batch in enumerate(got):
        assert batch["x"].device.type == device and torch.equal(batch["x"].cpu(), torch.full((4, 3), float(i)))
        assert torch.equal(batch["y"].cpu(), torch.arange(4) + i)


def test_device_prefetch_raises_the_streams_error_at_its_batch_and_stops_when_closed():
    import threading

    from core.data import device_prefetch

    stream = device_prefetch(_stream(10, fail_at=3), "cpu", depth=2)
    assert [int(b["x"][0, 0]) for b in (next(stream), next(stream), next(stream))] == [0, 1, 2]
    with pytest.raises(OSError, match="corrupt file at batch 3"):
        next(stream)
    endless = device_prefetch(_stream(10**9), "cpu", depth=2)
    next(endless)
    endless.close()
    for thread in threading.enumerate():
        if thread.name == "flowforge-prefetch":
            thread.join(timeout=5)
            assert not thread.is_alive()


@needs_cuda
def test_prefetched_training_matches_on_demand_batches(tmp_path):
    """trainer.prefetch (CUDA's background draw, pin and copy) trains on the very batches of prefetch = 0."""
    run(RF2D, [*DIGITS, "trainer.prefetch=0"], out=tmp_path / "plain")
    run(RF2D, DIGITS, out=tmp_path / "prefetch")
    assert_close(params(tmp_path / "plain"), params(tmp_path / "prefetch"), rtol=1e-4, atol=1e-5)
