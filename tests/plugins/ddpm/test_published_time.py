"""Time conventions of published networks: a DiT sampled by the ddpm plugin sees the integer step k.

The reference is written here from DiT's models.py (facebookresearch/DiT): ``TimestepEmbedder``
embeds the integer timestep ``t`` (0 = least noisy, 999 = noise) with
``[cos(t f_i), sin(t f_i)]``, ``f_i = exp(-ln(10000) i / 128)``, dim 256, then Linear-SiLU-Linear;
and one ancestral step of guided-diffusion's ``p_sample`` with ``learn_sigma`` (learned_range) and
``clip_denoised = False``, as DiT's sample.py runs it, on the linear schedule (1e-4 .. 0.02, T = 1000).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import registry
from ...reference.backbones import RefDiT, _modulate
from core.interfaces import DataSpec
from plugins.ddpm.diffusion import randn_like

SPEC = DataSpec(shape=(4, 8, 8), num_classes=10)
OPTIONS = {"plugin": "dit", "hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": 2, "learn_sigma": True}


def dit_timestep_embedding(t, dim=256, max_period=10000):
    """DiT models.py TimestepEmbedder.timestep_embedding (t: integer steps, (N,))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def dit_forward(ref: RefDiT, x, k, y):
    """DiT.forward(x, t=k, y) of models.py, with ref's layers."""
    b = x.shape[0]
    h = ref.x_embedder.proj(x).flatten(2).transpose(1, 2) + ref.pos_embed
    c = ref.t_embedder.mlp(dit_timestep_embedding(k)) + ref.y_embedder.embedding_table(y)
    for block in ref.blocks:
        h = block(h, c)
    shift, scale = ref.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    h = ref.final_layer.linear(_modulate(ref.final_layer.norm_final(h), shift, scale))
    g, p, co = int(h.shape[1] ** 0.5), ref.p, ref.out_channels
    return torch.einsum("nhwpqc->nchpwq", h.reshape(b, g, g, p, p, co)).reshape(b, co, g * p, g * p)


def reference_p_sample(eps_var, x, k: int, noise):
    """guided-diffusion p_sample at step k (learned_range variance, no clipping), float64 tables."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    eps, v = eps_var.double().chunk(2, dim=1)
    frac = (v + 1) / 2
    log_var = frac * np.log(betas[k]) + (1 - frac) * post_log_var[k]
    x = x.double()
    x_start = np.sqrt(1 / abar[k]) * x - np.sqrt(1 / abar[k] - 1) * eps
    mean = (betas[k] * np.sqrt(abar_prev[k]) / (1 - abar[k])) * x_start \
        + ((1 - abar_prev[k]) * np.sqrt(1 - betas[k]) / (1 - abar[k])) * x
    return mean if k == 0 else mean + torch.exp(0.5 * log_var) * noise.double()


def _randomised(time_input: str):
    torch.manual_seed(0)
    model = registry.build("backbone", {**OPTIONS, "time_input": time_input}, spec=SPEC).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5)
    ref = RefDiT(8, 2, 4, 64, 2, 4, num_classes=10, learn_sigma=True, time_scale=1.0).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


@pytest.mark.parametrize("k", [999, 500, 1, 0])
def test_one_ddpm_step_of_a_dit_equals_dits_own(k):
    model, ref = _randomised("integer_step")
    path = registry.build("path", {"plugin": "gaussian_diffusion", "variance": "learned_range"}, spec=SPEC)
    solver = registry.build("solver", {"plugin": "ddpm_ancestral", "clip_denoised": False}, spec=SPEC, path=path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *SPEC.shape, generator=g)
    y = torch.tensor([0, 3, 10])  # 10: the null label
    d = solver.diffusion
    ks = d.steps(k, 3, "cpu")
    with torch.no_grad():
        ours = solver.step(model(x, d.model_time(ks, x), y), x, ks, k, torch.Generator().manual_seed(7))
        theirs = reference_p_sample(dit_forward(ref, x, ks, y), x, k, randn_like(x, torch.Generator().manual_seed(7)))
    assert (theirs - x).abs().max() > 1e-3
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5)


def test_the_embedder_sees_k_and_the_default_does_not():
    """t = 1 - (k + 1) / T reaches the sinusoids as k; the default (1000 t = 999 - k) is far from DiT's."""
    model, ref = _randomised("integer_step")
    k = torch.arange(0, 1000, 37)
    t = (1 - (k + 1) / 1000).float()
    with torch.no_grad():
        torch.testing.assert_close(model.t_embedder(t), ref.t_embedder.mlp(dit_timestep_embedding(k)), rtol=0, atol=1e-5)
        scaled, _ = _randomised("scaled")
        assert (scaled.t_embedder(t) - ref.t_embedder.mlp(dit_timestep_embedding(k))).abs().max() > 1e-2
