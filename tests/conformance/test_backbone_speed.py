"""Speed paths of the `unet` and `dit` backbones: bf16 autocast and torch.compile give the eager float32 answer."""

from __future__ import annotations

import pytest
import torch

import registry
from core.interfaces import DataSpec

DIGITS = DataSpec(shape=(1, 8, 8), num_classes=10)
TINY = {
    "unet": {"preset": "digits", "channel_mult": [1, 2], "num_res_blocks": 1},
    "dit": {"preset": "DiT-digits", "depth": 2},
}
#: Smaller still for torch.compile (CPU inductor compiles a C++ kernel per fused group); the
#: UNet keeps its middle attention block.
COMPILE = {
    "unet": {"preset": "digits", "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": []},
    "dit": {"preset": "DiT-digits", "depth": 1},
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(plugin: str, sizes: dict = TINY, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": plugin, **sizes[plugin], **options}, spec=DIGITS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere (the zero-initialised layers would hide errors)
        for p in model.parameters():
            if p.requires_grad:
                fan_in = p[0].numel() if p.ndim >= 2 else 400
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def batch(n: int = 6):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g), torch.randint(0, 11, (n,), generator=g)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("plugin", ["unet", "dit"])
def test_bf16_autocast_forward_and_backward_run_and_are_close(plugin):
    model = tiny(plugin)
    x, t, y = batch()
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert ref.abs().max() > 0.1
    assert rel_error(out, ref) < 0.05
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t, y).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["unet", "dit"])
def test_torch_compile_matches_eager(plugin):
    torch._dynamo.reset()
    model = tiny(plugin, COMPILE)
    x, t, y = batch()
    eager = model(x, t, y)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(x, t, y)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
