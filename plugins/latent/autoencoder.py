"""``sd_vae``: diffusers' ``AutoencoderKL`` (Stable Diffusion / SD3 / FLUX VAEs) as an `Autoencoder`.

Weights come from a local diffusers folder (``config.json`` + weights, read with
``from_pretrained(path, local_files_only=True)``) or from one ``.safetensors`` file holding a
diffusers-layout state dict, with its architecture from ``config`` (a diffusers folder or a
``config.json``). Nothing is ever downloaded. ``scaling_factor`` and ``shift_factor`` are those
of the model's config (SD 1/2: 0.18215 and none; SD3: 1.5305 and 0.0609) unless given. Encoding
and decoding run in chunks of ``chunk_size`` images, without gradients, in float32 or bfloat16;
the module is frozen (``requires_grad = False``, always in eval mode) and is not part of the
trained model, so neither the optimizer nor checkpoints see it. diffusers is imported only when
an ``sd_vae`` is built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs
import torch
from torch import Tensor, nn

from core import validate
from registry import ConfigError

from .interface import Autoencoder


@attrs.define
class SDVAEConfig:
    """Options of the sd_vae autoencoder.

    Attributes:
        path: a local diffusers folder (config.json + weights) or a .safetensors state dict.
        config: for a .safetensors file: its architecture, a diffusers folder or config.json.
        scaling_factor: latents are ``(m - shift) * scale`` (None: the config's scaling_factor).
        shift_factor: see ``scaling_factor`` (None: the config's shift_factor, else 0).
        posterior: "mean" (deterministic latents) or "sample" (m + s eps, eps from the run's
            per-example random streams).
        dtype: "float32" or "bfloat16" for the VAE's weights and arithmetic.
        chunk_size: images encoded or decoded per call.
        device: "auto" (CUDA when visible), "cpu" or "cuda[:N]".
    """

    path: str
    config: str = ""
    scaling_factor: float | None = None
    shift_factor: float | None = None
    posterior: Literal["mean", "sample"] = "mean"
    dtype: Literal["float32", "bfloat16"] = "float32"
    chunk_size: int = 64
    device: str = "auto"

    def __attrs_post_init__(self) -> None:
        validate.positive(self, "chunk_size")
        if self.scaling_factor is not None:
            validate.positive(self, "scaling_factor")
        validate.device_available(self.device)


def _load_autoencoder(config: SDVAEConfig) -> nn.Module:
    """The diffusers AutoencoderKL that `config` names (local files only)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:  # pragma: no cover - diffusers is in the test extra
        raise ConfigError(f"sd_vae needs diffusers ({exc}); pip install diffusers", ("path",)) from None
    path = Path(config.path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{str(path)!r} is a folder without config.json: not a diffusers model folder", ("path",))
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist (a diffusers folder or a .safetensors file)", ("path",))
    if path.suffix != ".safetensors":
        raise ConfigError(f"{str(path)!r}: expected a diffusers folder or a .safetensors file", ("path",))
    arch = Path(config.config)
    arch = arch / "config.json" if arch.is_dir() else arch
    if not config.config or not arch.is_file():
        raise ConfigError("a .safetensors file needs its architecture: config = a diffusers folder or config.json",
                          ("config",))
    from safetensors.torch import load_file

    model = AutoencoderKL.from_config(json.loads(arch.read_text()))
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{str(path)!r} does not fit the AutoencoderKL of {str(arch)!r}: "
                          f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}", ("path",))
    return model


class SDVAE(nn.Module, Autoencoder):
    """See the module docstring."""

    def __init__(self, config: SDVAEConfig):
        super().__init__()
        self.config = config
        self.vae = _load_autoencoder(config)
        dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
        device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        self.vae.to(device=device, dtype=dtype).requires_grad_(False).eval()
        self.dtype, self.device = dtype, torch.device(device)
        vc = self.vae.config
        self.scale = float(config.scaling_factor if config.scaling_factor is not None else vc.scaling_factor)
        self.shift = float(config.shift_factor if config.shift_factor is not None else (vc.shift_factor or 0.0))
        self.sample_posterior = config.posterior == "sample"
        self.factor = 2 ** (len(vc.block_out_channels) - 1)

    def train(self, mode: bool = True) -> SDVAE:
        """Frozen: stays in eval mode whatever is asked."""
        return super().train(False)

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        c, h, w = shape
        if c != self.vae.config.in_channels or h % self.factor or w % self.factor:
            raise ConfigError(f"images {tuple(shape)} do not fit this VAE: {self.vae.config.in_channels} channels and "
                              f"sides divisible by {self.factor}")
        return (int(self.vae.config.latent_channels), h // self.factor, w // self.factor)

    @torch.no_grad()
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        means, stds = [], []
        for chunk in x.split(self.config.chunk_size):
            dist = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            means.append(((dist.mean.float() - self.shift) * self.scale).to(x.device))
            stds.append((dist.std.float() * self.scale).to(x.device))
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        out = [self.vae.decode((chunk.to(self.device).float() / self.scale + self.shift).to(self.dtype)).sample
               .float().to(z.device) for chunk in z.split(self.config.chunk_size)]
        return torch.cat(out)

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        h.update(repr((self.scale, self.shift, self.config.dtype)).encode())
        for name, tensor in sorted(self.vae.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


def make_sd_vae(config: SDVAEConfig) -> SDVAE:
    """Autoencoder factory."""
    return SDVAE(config)
