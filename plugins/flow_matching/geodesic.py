r"""The geodesic probability path of Riemannian flow matching (Chen & Lipman 2023, eq. 11 and 13).

On a manifold with exponential and log maps (manifolds.py), a convex scheduler's ``kappa_t``
(``alpha_t``: ``kappa_0 = 0``, ``kappa_1 = 1``) moves the source point along the geodesic to the data::

    x_t = exp_{x_0}(kappa_t log_{x_0}(x_1)),        u_t = d x_t / dt = d kappa_t * (d x_s / ds)|_{s = kappa_t},

so ``x_0`` at ``t = 0``, ``x_1`` at ``t = 1`` and, for cond_ot (``kappa_t = t``), constant speed
``|u_t| = dist(x_0, x_1)``. ``d x_s / ds`` is each manifold's closed form (the great-circle slerp on the
sphere, the wrapped straight line on the flat torus). ``u_t`` lies in the tangent space at ``x_t``; the
flow_matching objective projects the model's output there (``proju``) before the squared error, the
Riemannian norm of an embedded manifold. The source ``x_0`` is the manifold's uniform distribution
(a normalised Gaussian on the sphere, ``2 pi U[0, 1)^D`` on the torus; N(0, I) on Euclidean space, where
the path is the affine cond_ot path). Sample it with the ``riemannian_ode`` solver (riemannian.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from torch import Tensor

from core import rng
from core.interfaces import ConvexScheduler, DataSpec, Path, PathSample, Scheduler
from core.nn import append_dims
from registry import ConfigError

from .manifolds import Manifold, make_manifold
from .scheduler import CondOTScheduler


@attrs.define
class GeodesicConfig:
    """Options of the geodesic path.

    Attributes:
        manifold: "sphere" (the unit sphere in R^D, D the data's size), "torus" (the flat torus [0, 2 pi)^D)
            or "euclidean" (R^D). Data that names its manifold (e.g. vmf_mixture: sphere) must match.
    """

    manifold: Literal["sphere", "torus", "euclidean"] = "sphere"


class GeodesicPath(Path):
    """``x_t = exp_{x_0}(kappa_t log_{x_0} x_1)`` (module docstring). Shapes: ``x (B, ..., D)``, ``t (B,)``."""

    def __init__(self, manifold: Manifold, scheduler: ConvexScheduler):
        self.manifold, self.scheduler = manifold, scheduler

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        s = self.scheduler(t)
        kappa, d_kappa = (append_dims(v.to(x_1.dtype), x_1.ndim) for v in (s.alpha_t, s.d_alpha_t))
        x_t, dx_ds = self.manifold.geodesic(x_0, x_1, kappa)
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=x_t, target=d_kappa * dx_ds)

    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, *, dtype: torch.dtype | None = None,
                      draw: rng.ExampleRandom | None = None) -> Tensor:
        """``x_0 ~`` the manifold's uniform distribution ``(B, ..., D)`` (stream ``"noise"``)."""
        return self.manifold.sample_uniform(shape, generator, device, dtype=dtype, draw=draw)

    def tangent(self, x: Tensor, v: Tensor) -> Tensor:
        """``v`` ``(B, ..., D)`` projected onto the tangent space at ``x`` (what a model's output means here)."""
        return self.manifold.proju(x, v)

    def __repr__(self) -> str:
        return f"GeodesicPath({self.manifold!r}, {self.scheduler!r})"


def make_geodesic(config: GeodesicConfig, spec: DataSpec | None = None,
                  scheduler: Scheduler | None = None) -> GeodesicPath:
    """Path factory for ``plugin = "geodesic"``: kappa_t from a convex [scheduler] (cond_ot without one)."""
    if scheduler is not None and not isinstance(scheduler, ConvexScheduler):
        raise ConfigError(f"the geodesic path moves x_0 a fraction kappa_t of the way to x_1: it needs a convex "
                          f"scheduler (cond_ot or polynomial), not {type(scheduler).__name__}")
    if spec is not None:
        if spec.kind != "continuous":
            raise ConfigError(f"the geodesic path needs continuous data, not {spec.kind}", ("manifold",))
        named = spec.extra.get("manifold")
        if named is not None and named != config.manifold:
            raise ConfigError(f"the data lies on the {named} but the path's manifold is {config.manifold!r}",
                              ("manifold",))
        if config.manifold == "sphere" and (len(spec.shape) != 1 or spec.shape[0] < 2):
            raise ConfigError(f"the sphere path needs points of shape (D,), D >= 2 (unit vectors in R^D); the data "
                              f"has shape {spec.shape}", ("manifold",))
    return GeodesicPath(make_manifold(config.manifold), scheduler or CondOTScheduler())


__all__ = ["GeodesicConfig", "GeodesicPath", "make_geodesic"]
