"""Conformance checks for continuous probability paths (``core.interfaces.Path``), run in float64.

For any continuous path whose regression target is the conditional velocity (`check_path`):

1. ``sample(x_0, x_1, t)`` returns a PathSample whose ``x_t`` and ``target``
   have the data's shape and dtype and which carries ``x_0, x_1, t`` through.
2. The target is the time derivative of ``x_t`` (autograd through the path:
   a Jacobian-vector product in ``t``), to float64 precision.
3. ``sample_source(shape, generator)`` has the requested shape and is a pure
   function of the generator's seed.

For affine paths (`check_affine_path`), which also convert between
predictions through ``convert(pred, x_t, t, source, target)`` with
``source, target`` in ``("velocity", "epsilon", "x1")``:

4. Every conversion is exact on a path draw: from ``(x_0, x_1, t)``, the
   velocity ``target``, the epsilon ``x_0`` and ``x_1`` map to one another.
5. Every conversion round-trips: ``convert(convert(p, a, b), b, a) == p`` for an
   arbitrary ``p`` (not only the consistent one).

Tolerances scale with the conditioning of the conversion at ``t``
(``1 / min(alpha_t, sigma_t, |sigma d alpha - alpha d sigma|)``), which is what
float64 can promise near the ends of time. `check_path` / `check_affine_path`
draw shapes, batches, times and seeds with hypothesis; the ``check_*_at``
functions take explicit values for use inside a caller's own ``@given`` test.
Each raises ``AssertionError`` naming the path and the invariant.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from core.interfaces import Path, PathSample

try:  # the lead's shared strategies, when present
    from core.testing.strategies import batch_sizes, data_shapes, seeds, time_tensors
except ImportError:  # pragma: no cover - standalone fallback
    def data_shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 5):
        return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)

    def batch_sizes(max_batch: int = 6):
        return st.integers(1, max_batch)

    def seeds():
        return st.integers(0, 2**31 - 1)

    def time_tensors(batch: int, eps: float = 1e-3, dtype: torch.dtype = torch.float64):
        return st.lists(st.floats(eps, 1 - eps), min_size=batch, max_size=batch).map(
            lambda v: torch.tensor(v, dtype=dtype))

PREDICTIONS = ("velocity", "epsilon", "x1")


def _draw(shape: tuple[int, ...], batch: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    x_1 = 2.0 * torch.randn(batch, *shape, generator=g, dtype=torch.float64) + 0.5
    return x_0, x_1


def check_sample_at(path: Path, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
    """Invariant 1 at the given draw."""
    ps = path.sample(x_0, x_1, t)
    assert isinstance(ps, PathSample), f"{path!r}: sample returned {type(ps).__name__}, not PathSample"
    for name in ("x_t", "target"):
        v = getattr(ps, name)
        assert v.shape == x_1.shape, f"{path!r}: {name} has shape {tuple(v.shape)}, data has {tuple(x_1.shape)}"
        assert v.dtype == x_1.dtype, f"{path!r}: {name} has dtype {v.dtype}, data has {x_1.dtype}"
    assert ps.t is t or torch.equal(ps.t, t), f"{path!r}: PathSample.t is not the t it was given"
    assert torch.equal(ps.x_0, x_0) and torch.equal(ps.x_1, x_1), f"{path!r}: PathSample does not carry x_0, x_1"
    return ps


def check_target_is_velocity_at(path: Path, x_0: Tensor, x_1: Tensor, t: Tensor,
                                rtol: float = 1e-9, atol: float = 1e-10) -> None:
    """Invariant 2: ``target == d x_t / dt`` (a JVP in t with tangent 1)."""
    t = t.detach().to(torch.float64)

    def x_t(tt: Tensor) -> Tensor:
        return path.sample(x_0, x_1, tt).x_t

    _, deriv = torch.autograd.functional.jvp(x_t, (t,), (torch.ones_like(t),))
    target = path.sample(x_0, x_1, t).target
    err = (target - deriv).abs().max().item() if target.numel() else 0.0
    bound = atol + rtol * deriv.abs().max().item() if deriv.numel() else atol
    assert err <= bound, (f"{path!r}: the target is not d x_t/dt (max difference {err:.3g}) at t={t.tolist()}")


def check_source(path: Path, shape: tuple[int, ...], batch: int, seed: int) -> None:
    """Invariant 3."""
    a = path.sample_source((batch, *shape), generator=torch.Generator().manual_seed(seed))
    b = path.sample_source((batch, *shape), generator=torch.Generator().manual_seed(seed))
    assert tuple(a.shape) == (batch, *shape), f"{path!r}: sample_source shape {tuple(a.shape)}, expected {(batch, *shape)}"
    assert torch.equal(a, b), f"{path!r}: sample_source is not a function of the generator's seed"


def _conditioning(path: Path, t: Tensor, ndim: int) -> Tensor:
    s = path.scheduler(t)  # type: ignore[attr-defined]
    det = (s.sigma_t * s.d_alpha_t - s.alpha_t * s.d_sigma_t).abs()
    small = torch.minimum(torch.minimum(s.alpha_t.abs(), s.sigma_t.abs()), det)
    big = torch.stack([s.alpha_t.abs(), s.sigma_t.abs(), s.d_alpha_t.abs(), s.d_sigma_t.abs(),
                       torch.ones_like(t)]).amax(0)
    return (big / small).reshape(t.shape + (1,) * (ndim - 1))


def check_conversions_at(path: Path, x_0: Tensor, x_1: Tensor, t: Tensor, rtol: float = 1e-11) -> None:
    """Invariants 4 and 5 at the given draw (float64)."""
    ps = path.sample(x_0, x_1, t)
    truth = {"velocity": ps.target, "epsilon": x_0, "x1": x_1}
    cond = _conditioning(path, t, x_1.ndim)
    scale = 1.0 + max(v.abs().max().item() for v in (*truth.values(), ps.x_t))
    tol = rtol * scale * cond
    g = torch.Generator().manual_seed(1234)
    for src in PREDICTIONS:
        for dst in PREDICTIONS:
            got = path.convert(truth[src], ps.x_t, t, src, dst)  # type: ignore[attr-defined]
            assert got.shape == x_1.shape, f"{path!r}: {src}->{dst} changed the shape"
            bad = ((got - truth[dst]).abs() > tol).any().item()
            assert not bad, (f"{path!r}: converting the {src} of a path draw to {dst} is off by "
                             f"{(got - truth[dst]).abs().max().item():.3g} at t={t.tolist()}")
            if src == dst:
                continue
            p = torch.randn(x_1.shape, generator=g, dtype=x_1.dtype)
            back = path.convert(path.convert(p, ps.x_t, t, src, dst), ps.x_t, t, dst, src)  # type: ignore[attr-defined]
            bad = ((back - p).abs() > rtol * (scale + 1.0) * cond * cond).any().item()
            assert not bad, (f"{path!r}: {src} -> {dst} -> {src} does not round-trip (off by "
                             f"{(back - p).abs().max().item():.3g}) at t={t.tolist()}")


def _given(max_examples: int, eps: float):
    return (settings(max_examples=max_examples, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]),
            given(shape=data_shapes(), batch=batch_sizes(), seed=seeds(),
                  data=st.data()))


def check_path(path: Path, *, max_examples: int = 40, eps: float = 1e-3) -> None:
    """Invariants 1-3 over hypothesis-drawn shapes, batches, times in ``[eps, 1 - eps]`` and seeds."""
    settings_, given_ = _given(max_examples, eps)

    @settings_
    @given_
    def run(shape, batch, seed, data) -> None:
        t = data.draw(time_tensors(batch, eps=eps, dtype=torch.float64))
        x_0, x_1 = _draw(shape, batch, seed)
        check_sample_at(path, x_0, x_1, t)
        check_target_is_velocity_at(path, x_0, x_1, t)
        check_source(path, shape, batch, seed)

    run()


def check_affine_path(path: Path, *, max_examples: int = 40, eps: float = 1e-3) -> None:
    """`check_path` plus invariants 4-5 (the path has ``scheduler`` and ``convert``)."""
    assert hasattr(path, "convert") and hasattr(path, "scheduler"), (
        f"{path!r}: an affine path exposes its scheduler and convert(pred, x_t, t, source, target)")
    check_path(path, max_examples=max_examples, eps=eps)
    settings_, given_ = _given(max_examples, eps)

    @settings_
    @given_
    def run(shape, batch, seed, data) -> None:
        t = data.draw(time_tensors(batch, eps=eps, dtype=torch.float64))
        x_0, x_1 = _draw(shape, batch, seed)
        check_conversions_at(path, x_0, x_1, t)

    run()
