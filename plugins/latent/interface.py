"""The ``autoencoder`` kind: what a latent data source and the decoded metrics ask of a VAE.

An autoencoder maps images ``x (B, C, H, W)`` in [-1, 1] to *scaled* latents
``z (B, c, h, w)`` and back. With the encoder's posterior ``N(m, s^2)`` (per element) and the
autoencoder's ``scale`` and ``shift``, the scaled latents are (SD / SD3 pipelines)

    z = (m + s * eps - shift) * scale,        x = decoder(z / scale + shift),

with ``eps = 0`` for the posterior mean. `moments` returns the scaled mean and standard
deviation ``((m - shift) scale, s scale)`` so that a caller can draw ``eps`` from its own
per-example random streams (``core.rng``). An autoencoder is frozen: it never trains.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from torch import Tensor


class Autoencoder(abc.ABC):
    """A frozen image autoencoder (see the module docstring)."""

    #: whether encoding draws from the posterior (True) or takes its mean (False)
    sample_posterior: bool = False

    @abc.abstractmethod
    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape ``(c, h, w)`` of one latent for one image of `shape` ``(C, H, W)``."""

    @abc.abstractmethod
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, C, H, W)`` -> scaled posterior (mean, std), each ``(B, c, h, w)`` float32."""

    @abc.abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents ``(B, c, h, w)`` -> images ``(B, C, H, W)`` float32 on ``z``'s device."""

    def encode(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Images ``(B, C, H, W)`` -> scaled latents: the posterior mean, or ``mean + std * noise``."""
        mean, std = self.moments(x)
        return mean if noise is None else mean + std * noise.to(mean)

    def fingerprint(self) -> str:
        """A string that changes with the weights and the scaling (keys latent caches)."""
        return type(self).__name__
