"""Conformance checks for schedulers (``core.interfaces.Scheduler``), run in float64.

A scheduler maps ``t`` to ``(alpha_t, sigma_t, d alpha_t/dt, d sigma_t/dt)``. The checks:

1. ``d_alpha_t`` and ``d_sigma_t`` equal the autograd derivatives of ``alpha_t``
   and ``sigma_t`` (float64, relative tolerance 1e-9), and every output has the
   shape and dtype of ``t``.
2. The boundary values ``(alpha_0, sigma_0, alpha_1, sigma_1)`` are the expected
   ones (``(0, 1, 1, 0)`` unless the scheduler documents others, e.g. VP).
3. ``alpha_t / sigma_t`` is strictly increasing and
   ``snr_inverse(alpha_t / sigma_t) == t`` (and ``snr_inverse`` accepts ``inf``
   when ``sigma_1 = 0``).
4. For convex schedulers (``ConvexScheduler``): ``sigma_t = 1 - alpha_t`` and
   ``kappa_inverse(alpha_t) == t``.

`check_scheduler` runs them all over hypothesis-drawn times; the
``check_*`` functions take explicit times, for use inside a caller's own
``@given`` test (hypothesis does not nest). Each raises ``AssertionError``
naming the scheduler and the violated invariant.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from core.interfaces import ConvexScheduler, Scheduler, SchedulerOutput

try:  # the lead's shared strategies, when present
    from core.testing.strategies import time_tensors
except ImportError:  # pragma: no cover - standalone fallback
    def time_tensors(batch: int, eps: float = 1e-3, dtype: torch.dtype = torch.float64):
        return st.lists(st.floats(eps, 1 - eps), min_size=batch, max_size=batch).map(
            lambda v: torch.tensor(v, dtype=dtype))

#: Default expected ``(alpha_0, sigma_0, alpha_1, sigma_1)``.
STANDARD_BOUNDARIES = (0.0, 1.0, 1.0, 0.0)


def times(max_batch: int = 8, eps: float = 1e-3) -> st.SearchStrategy[Tensor]:
    """Float64 time tensors of shape ``(B,)`` with entries in ``[eps, 1 - eps]``."""
    return st.integers(1, max_batch).flatmap(lambda b: time_tensors(b, eps=eps, dtype=torch.float64))


def _name(s: Scheduler) -> str:
    return repr(s) if type(s).__repr__ is not object.__repr__ else type(s).__name__


def _close(a: Tensor, b: Tensor, rtol: float, atol: float) -> bool:
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol))


def check_output(scheduler: Scheduler, t: Tensor) -> SchedulerOutput:
    """Outputs are a SchedulerOutput shaped and typed like ``t``."""
    out = scheduler(t)
    assert isinstance(out, SchedulerOutput), f"{_name(scheduler)}: returned {type(out).__name__}, not SchedulerOutput"
    for field in ("alpha_t", "sigma_t", "d_alpha_t", "d_sigma_t"):
        v = getattr(out, field)
        assert v.shape == t.shape, f"{_name(scheduler)}: {field} has shape {tuple(v.shape)}, t has {tuple(t.shape)}"
        assert v.dtype == t.dtype, f"{_name(scheduler)}: {field} has dtype {v.dtype}, t has {t.dtype}"
    return out


def check_derivatives(scheduler: Scheduler, t: Tensor, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """``d_alpha_t, d_sigma_t`` equal autograd's ``d alpha/dt, d sigma/dt`` at ``t`` (float64)."""
    t = t.detach().to(torch.float64).requires_grad_(True)
    out = check_output(scheduler, t)
    for value, deriv, name in ((out.alpha_t, out.d_alpha_t, "alpha"), (out.sigma_t, out.d_sigma_t, "sigma")):
        if not value.requires_grad:  # constant in t
            auto = torch.zeros_like(t)
        else:
            (auto,) = torch.autograd.grad(value.sum(), t, retain_graph=True, allow_unused=True)
            auto = torch.zeros_like(t) if auto is None else auto
        got = deriv.detach()
        assert _close(got, auto, rtol, atol), (
            f"{_name(scheduler)}: d_{name}_t does not match autograd at t={t.detach().tolist()}: "
            f"got {got.tolist()}, autograd {auto.tolist()}")


def check_boundaries(scheduler: Scheduler, expected: tuple[float, float, float, float] = STANDARD_BOUNDARIES,
                     atol: float = 1e-12) -> None:
    """``(alpha_0, sigma_0, alpha_1, sigma_1)`` equal `expected` (float64)."""
    out = scheduler(torch.tensor([0.0, 1.0], dtype=torch.float64))
    got = (out.alpha_t[0].item(), out.sigma_t[0].item(), out.alpha_t[1].item(), out.sigma_t[1].item())
    for name, g, e in zip(("alpha_0", "sigma_0", "alpha_1", "sigma_1"), got, expected):
        assert abs(g - e) <= atol + 1e-12 * abs(e), f"{_name(scheduler)}: {name} = {g!r}, expected {e!r}"


def check_snr_inverse(scheduler: Scheduler, t: Tensor, atol: float = 1e-9) -> None:
    """``alpha/sigma`` strictly increasing in t, and ``snr_inverse(alpha_t / sigma_t) == t``."""
    t = t.detach().to(torch.float64)
    out = scheduler(t)
    snr = out.alpha_t / out.sigma_t
    back = scheduler.snr_inverse(snr)
    assert back.shape == t.shape, f"{_name(scheduler)}: snr_inverse changed the shape {tuple(t.shape)} -> {tuple(back.shape)}"
    err = (back - t).abs().max().item()
    assert err <= atol, f"{_name(scheduler)}: snr_inverse(alpha_t/sigma_t) differs from t by {err:.3g} at t={t.tolist()}"
    # d/dt (alpha/sigma) = (sigma d alpha - alpha d sigma) / sigma^2 > 0
    rate = out.sigma_t * out.d_alpha_t - out.alpha_t * out.d_sigma_t
    assert bool((rate > 0).all()), f"{_name(scheduler)}: alpha_t/sigma_t is not increasing at t={t.tolist()}"


def check_snr_inverse_ends(scheduler: Scheduler, expected: tuple[float, float, float, float] = STANDARD_BOUNDARIES) -> None:
    """``snr_inverse(inf) == 1`` when ``sigma_1 = 0``, and ``snr_inverse(0) == 0`` when ``alpha_0 = 0``."""
    if expected[3] == 0.0:
        v = scheduler.snr_inverse(torch.tensor([float("inf")], dtype=torch.float64)).item()
        assert abs(v - 1.0) < 1e-12, f"{_name(scheduler)}: snr_inverse(inf) = {v!r}, expected 1"
    if expected[0] == 0.0:
        v = scheduler.snr_inverse(torch.tensor([0.0], dtype=torch.float64)).item()
        assert abs(v) < 1e-12, f"{_name(scheduler)}: snr_inverse(0) = {v!r}, expected 0"


def check_kappa(scheduler: ConvexScheduler, t: Tensor, atol: float = 1e-9) -> None:
    """Convex: ``sigma_t = 1 - alpha_t`` and ``kappa_inverse(kappa_t) == t`` with ``kappa_t = alpha_t``."""
    t = t.detach().to(torch.float64)
    out = scheduler(t)
    gap = (out.sigma_t - (1 - out.alpha_t)).abs().max().item()
    assert gap <= 1e-12, f"{_name(scheduler)}: a convex scheduler needs sigma_t = 1 - alpha_t (off by {gap:.3g})"
    back = scheduler.kappa_inverse(out.alpha_t)
    err = (back - t).abs().max().item()
    assert err <= atol, f"{_name(scheduler)}: kappa_inverse(kappa_t) differs from t by {err:.3g} at t={t.tolist()}"


def check_scheduler(scheduler: Scheduler, *, boundaries: tuple[float, float, float, float] | None = None,
                    max_examples: int = 60, eps: float = 1e-3) -> None:
    """Run every check; times are drawn by hypothesis in ``[eps, 1 - eps]``.

    Args:
        boundaries: expected ``(alpha_0, sigma_0, alpha_1, sigma_1)``; default: the
            scheduler's ``boundaries`` attribute if it has one, else ``(0, 1, 1, 0)``.
    """
    expected = boundaries or tuple(getattr(scheduler, "boundaries", STANDARD_BOUNDARIES))
    check_boundaries(scheduler, expected)
    check_snr_inverse_ends(scheduler, expected)

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(t=times(eps=eps))
    def run(t: Tensor) -> None:
        check_derivatives(scheduler, t)
        check_snr_inverse(scheduler, t)
        if isinstance(scheduler, ConvexScheduler):
            check_kappa(scheduler, t)

    run()
