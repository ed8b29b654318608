"""A tiny randomly initialised diffusers AutoencoderKL saved as a local folder (shared by the latent tests)."""

from __future__ import annotations

from pathlib import Path

import torch

#: block_out_channels (8, 16): one downsampling, 32x32 grey images -> 4 x 16 x 16 latents
TINY_VAE = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                norm_num_groups=4, layers_per_block=1, sample_size=32, scaling_factor=0.7, shift_factor=0.1)


def save_tiny_vae(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny AutoencoderKL written to `folder` with save_pretrained; returns `folder`."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**{**TINY_VAE, **overrides})
    vae.save_pretrained(str(folder))
    return folder
