r"""Riemannian manifolds for flow matching on general geometries (Chen & Lipman 2023).

Points are tensors ``x (..., D)`` in an embedding (the sphere) or in coordinates (the flat torus,
Euclidean space); tangent vectors ``u`` have the same shape. Every manifold gives

* ``expmap(x, u)``: the end ``gamma(1)`` of the geodesic with ``gamma(0) = x``, ``gamma'(0) = u``;
* ``logmap(x, y)``: the tangent vector ``u`` at ``x`` with ``expmap(x, u) = y`` of least norm;
* ``projx(x)``: the nearest point of the manifold; ``proju(x, u)``: the tangent part of ``u`` at ``x``;
* ``transp(x, y, v)``: ``v`` in T_x carried to T_y (parallel transport along the geodesic where given);
* ``dist(x, y) = |logmap(x, y)|`` ``(...,)``, the geodesic distance;
* ``geodesic(x_0, x_1, s)``: ``x_s = expmap(x_0, s logmap(x_0, x_1))`` and its derivative ``d x_s / ds``
  (``s`` broadcastable against the points, e.g. ``(B, 1)``); constant speed ``|d x_s/ds| = dist(x_0, x_1)``.
  The base class differentiates with a forward-mode JVP in ``s``; each manifold below overrides it in closed form;
* ``sample_uniform``: the uniform distribution of a compact manifold (the source of a geodesic path).

Formulas (``<., .>`` the Euclidean inner product over the last dimension):

* `Euclidean` R^D: ``exp_x u = x + u``, ``log_x y = y - x``, ``transp = id``, ``x_s = x_0 + s (x_1 - x_0)``;
  its "uniform" source is N(0, I) (R^D has no uniform distribution).
* `Sphere` S^{D-1} = {|x| = 1} in R^D: ``projx x = x / |x|``, ``proju(x, u) = u - <x, u> x``,
  ``exp_x u = cos|u| x + sin|u| u / |u|``, ``log_x y = theta w / |w|`` with ``w = y - <x, y> x`` and
  ``theta = dist(x, y) = atan2(|w|, <x, y>)``; the great circle ``x_s = cos(s theta) x_0 + sin(s theta) v / theta``
  (``v = log_{x_0} x_1``), ``d x_s / ds = -theta sin(s theta) x_0 + cos(s theta) v`` (the slerp). The log map
  of antipodal points is undefined (0 here). Parallel transport from x to y along the great circle:
  ``v - <y, v> / (1 + <x, y>) (x + y)``. Uniform: ``n / |n|``, ``n ~ N(0, I)``.
* `FlatTorus` [0, 2 pi)^D: ``projx x = x mod 2 pi``, ``proju = transp = id``, ``exp_x u = (x + u) mod 2 pi``,
  ``log_x y = atan2(sin(y - x), cos(y - x))`` (each coordinate in (-pi, pi]); ``x_s = (x_0 + s v) mod 2 pi``,
  ``d x_s / ds = v``. Uniform: ``2 pi U[0, 1)^D``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from core import rng

TWO_PI = 2.0 * math.pi


class Manifold(abc.ABC):
    """A Riemannian manifold (module docstring); every method acts on the last dimension."""

    name: str = ""

    @abc.abstractmethod
    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """``exp_x(u)`` ``(..., D)``."""

    @abc.abstractmethod
    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        """``log_x(y)`` ``(..., D)``, tangent at ``x``."""

    @abc.abstractmethod
    def projx(self, x: Tensor) -> Tensor:
        """The point of the manifold nearest ``x`` ``(..., D)``."""

    @abc.abstractmethod
    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """The tangent part at ``x`` of the ambient vector ``u`` ``(..., D)``."""

    @abc.abstractmethod
    def sample_uniform(self, shape: Sequence[int], generator: torch.Generator | None = None, device: Any = None, *,
                       dtype: torch.dtype | None = None, draw: rng.ExampleRandom | None = None) -> Tensor:
        """``(B, ..., D)`` points from the manifold's uniform distribution (stream ``"noise"`` of `draw`)."""

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Carry ``v`` in T_x to T_y ``(..., D)``; by default the projection ``proju(y, v)``."""
        return self.proju(y, v)

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Geodesic distance ``|log_x(y)|`` ``(...,)``."""
        return self.logmap(x, y).norm(dim=-1)

    def geodesic(self, x_0: Tensor, x_1: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_s, d x_s / ds)`` of ``x_s = exp_{x_0}(s log_{x_0} x_1)`` by `torch.autograd.functional.jvp` in ``s``."""
        v = self.logmap(x_0, x_1)
        s = s.to(v.dtype)
        with torch.enable_grad():
            return torch.autograd.functional.jvp(lambda s_: self.expmap(x_0, s_ * v), (s,), (torch.ones_like(s),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _gaussian(shape, generator, device, dtype, draw) -> Tensor:
    return rng.standard_normal(shape, generator, device, dtype=dtype, draw=draw)


class Euclidean(Manifold):
    """R^D with straight lines: ``exp_x u = x + u``, ``log_x y = y - x`` (its source is N(0, I))."""

    name = "euclidean"

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return x + u

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        return y - x

    def projx(self, x: Tensor) -> Tensor:
        return x

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    def geodesic(self, x_0: Tensor, x_1: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        v = x_1 - x_0
        return x_0 + s.to(v.dtype) * v, v

    def sample_uniform(self, shape, generator=None, device=None, *, dtype=None, draw=None) -> Tensor:
        """N(0, I) (R^D has no uniform distribution)."""
        return _gaussian(shape, generator, device, dtype, draw)


def _sinc(a: Tensor) -> Tensor:
    """``sin(a) / a`` with its Taylor series ``1 - a^2 / 6`` near 0 (finite gradients)."""
    small = a.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(a), a)
    return torch.where(small, 1.0 - a * a / 6.0, torch.sin(safe) / safe)


class Sphere(Manifold):
    """The unit sphere S^{D-1} in R^D (module docstring for the formulas)."""

    name = "sphere"

    def projx(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u - (x * u).sum(-1, keepdim=True) * x

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        n = u.norm(dim=-1, keepdim=True)
        return torch.cos(n) * x + _sinc(n) * u

    def _angle(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(w, |w|, theta)``: ``w = y - <x, y> x``, ``theta = atan2(|w|, <x, y>)``, keepdim."""
        w = y - (x * y).sum(-1, keepdim=True) * x
        wn = w.norm(dim=-1, keepdim=True)
        return w, wn, torch.atan2(wn, (x * y).sum(-1, keepdim=True))

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        w, wn, theta = self._angle(x, y)
        # theta / |w| = theta / sin(theta) on the sphere: 1 + theta^2 / 6 near 0
        small = wn < 1e-6
        ratio = torch.where(small, 1.0 + theta * theta / 6.0, theta / torch.where(small, torch.ones_like(wn), wn))
        return ratio * w

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        return self._angle(x, y)[2].squeeze(-1)

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Parallel transport along the great circle: ``v - <y, v> / (1 + <x, y>) (x + y)`` (not antipodal)."""
        return v - (y * v).sum(-1, keepdim=True) / (1.0 + (x * y).sum(-1, keepdim=True)) * (x + y)

    def geodesic(self, x_0: Tensor, x_1: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        v = self.logmap(x_0, x_1)
        theta = v.norm(dim=-1, keepdim=True)
        a = s.to(v.dtype) * theta
        return torch.cos(a) * x_0 + s * _sinc(a) * v, -theta * torch.sin(a) * x_0 + torch.cos(a) * v

    def sample_uniform(self, shape, generator=None, device=None, *, dtype=None, draw=None) -> Tensor:
        """``n / |n|`` with ``n ~ N(0, I)``: uniform on the sphere by rotation invariance."""
        return self.projx(_gaussian(shape, generator, device, dtype, draw))


class FlatTorus(Manifold):
    """The flat torus [0, 2 pi)^D (module docstring for the formulas)."""

    name = "torus"

    def projx(self, x: Tensor) -> Tensor:
        return torch.remainder(x, TWO_PI)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        return torch.remainder(x + u, TWO_PI)

    def logmap(self, x: Tensor, y: Tensor) -> Tensor:
        d = y - x
        return torch.atan2(torch.sin(d), torch.cos(d))

    def geodesic(self, x_0: Tensor, x_1: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        v = self.logmap(x_0, x_1)
        return torch.remainder(x_0 + s.to(v.dtype) * v, TWO_PI), v

    def sample_uniform(self, shape, generator=None, device=None, *, dtype=None, draw=None) -> Tensor:
        """``2 pi U[0, 1)`` per coordinate."""
        if draw is not None:
            u = draw.rand(tuple(shape)[1:], "noise", device=device, dtype=dtype or torch.float32)
        else:
            u = torch.rand(*shape, generator=generator).to(device or "cpu", dtype or torch.float32)
        return self.projx(TWO_PI * u)


#: The manifolds by their config name.
MANIFOLDS: dict[str, type[Manifold]] = {"euclidean": Euclidean, "sphere": Sphere, "torus": FlatTorus}


def make_manifold(name: str) -> Manifold:
    """The manifold named `name` (a key of `MANIFOLDS`)."""
    if name not in MANIFOLDS:
        raise ValueError(f"unknown manifold {name!r}; expected one of {tuple(MANIFOLDS)}")
    return MANIFOLDS[name]()


__all__ = ["MANIFOLDS", "Euclidean", "FlatTorus", "Manifold", "Sphere", "make_manifold"]
