"""SD3's knobs: the timestep shift (training times and the sampling grid) against diffusers'
FlowMatchEulerDiscreteScheduler, and QK normalisation in DiT attention against a reference written here.

Conventions: flowforge's t = 0 is noise, diffusers' sigma = 1 is noise, so t = 1 - sigma.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.interfaces import DataSpec
from plugins.flow_matching.objective import FlowMatchingConfig, sample_times

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("steps", [4, 28])
def test_shifted_sampling_grid_is_diffusers_sigmas(shift, steps):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))  # the unshifted grid without its last 0
    solver = registry.build("solver", {"plugin": "ode", "method": "euler", "steps": steps, "time_shift": shift})
    grid = solver.time_grid(dtype=torch.float64)
    torch.testing.assert_close(grid, 1.0 - sched.sigmas.double(), rtol=0, atol=1e-6)  # diffusers keeps float32


@pytest.mark.parametrize("shift", [3.0, 1.5])
def test_shifted_training_times_are_diffusers_training_sigmas(shift):
    """diffusers' training sigmas (the shifted k / 1000) are the shifted times of t = 1 - k / 1000."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    from plugins.flow_matching.solver import shift_times

    t = 1.0 - torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(shift_times(t, shift), 1.0 - sched.sigmas.double(), rtol=0, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(shift=st.floats(0.2, 8.0))
def test_sampled_times_pass_through_the_shift(shift):
    """A uniform draw u becomes the time whose diffusers noise level is s (1-u) / (1 + (s-1)(1-u))."""
    base = sample_times(FlowMatchingConfig(time_sampler="uniform"), 64, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    shifted = sample_times(FlowMatchingConfig(time_sampler="uniform", time_shift=shift), 64,
                           generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = 1 - base
    torch.testing.assert_close(shifted, 1 - shift * sigma / (1 + (shift - 1) * sigma), rtol=0, atol=1e-12)
    if shift > 1:
        assert (shifted <= base + 1e-15).all()


def test_bad_shift_is_a_config_error():
    with pytest.raises(registry.ConfigError, match="positive"):
        registry.build("solver", {"plugin": "ode", "time_shift": 0.0})
    with pytest.raises(registry.ConfigError, match="uniform grid"):
        registry.build("solver", {"plugin": "ode", "time_shift": 3.0, "times": [0.0, 0.5, 1.0]})


def test_qk_norm_attention_is_rmsnorm_of_each_heads_queries_and_keys():
    """softmax(n(q) n(k)^T / sqrt(d)) v with n(q) = g * q / sqrt(mean(q^2) + 1e-6) (SD3), written out here."""
    spec = DataSpec(shape=(4, 8, 8))
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "dit", "hidden_size": 32, "depth": 1, "num_heads": 4,
                                        "patch_size": 2, "qk_norm": True}, spec=spec).eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2.0)
        attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 32)
    b, n, d, h = 2, 16, 32, 4
    qkv = attn.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    rms = lambda a, g: g * a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(b, n, d))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, rtol=0, atol=1e-5)
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    plain = registry.build("backbone", {"plugin": "dit", "hidden_size": 32, "depth": 1, "num_heads": 4,
                                        "patch_size": 2}, spec=spec)
    assert not any("q_norm" in key for key in plain.state_dict())  # DiT checkpoints still load


def test_tf32_switch_allows_tensorfloat32(tmp_path):
    from core.run import run

    from ...conftest import RF2D, TINY_RF2D

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        run(RF2D, [*TINY_RF2D, "trainer.steps=2", "trainer.tf32=true"], out=tmp_path / "on")
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
