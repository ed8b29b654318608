"""Conformance checks for ODE-style solvers (``Solver.sample`` integrating dx/dt = f(x, t) from t0=0 to t1=1).

A solver is given to the kit as a factory ``make(method, steps) -> Solver``
and a mapping ``{method: (stages, order)}``. The checks:

1. A constant field ``f = c`` is integrated exactly: ``x(1) = x(0) + c``.
2. On ``dx/dt = a x`` (solution ``x(1) = x(0) e^a``) the global error shrinks
   by about ``2^order`` when the steps double.
3. The output has the input's shape and dtype.
4. Solving a batch equals solving each item alone.
5. The reported evaluation count equals ``steps x stages``, and equals the
   number of calls the solver actually made.
6. ``intermediates=True`` returns ``steps + 1`` states starting at ``x_init``
   and ending at the result, with their times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from core.interfaces import Solver, SolverResult

SolverFactory = Callable[[str, int], Solver]


class CountingField:
    """``f(x, t, y) = fn(x, t)`` that counts its calls and checks ``t`` has shape ``(B,)``."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], name: str = "field"):
        self.fn, self.name, self.calls = fn, name, 0

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        t = torch.as_tensor(t)
        assert t.shape == (x.shape[0],), (
            f"solver called the model with t of shape {tuple(t.shape)}; the contract is t of shape (B,) = ({x.shape[0]},)")
        return self.fn(x, t)


def _run(solver: Solver, field: Callable, x: Tensor, **kw) -> SolverResult:
    out = solver.sample(field, x, **kw)
    assert isinstance(out, SolverResult), f"{type(solver).__name__}.sample must return a SolverResult, got {type(out).__name__}"
    return out


def check_constant_field(make: SolverFactory, method: str, steps: int, dtype: torch.dtype = torch.float64) -> None:
    g = torch.Generator().manual_seed(steps)
    x0 = torch.randn(3, 4, generator=g, dtype=dtype)
    c = torch.randn(4, generator=g, dtype=dtype)
    out = _run(make(method, steps), CountingField(lambda x, t: c.expand_as(x)), x0)
    err = (out.x - (x0 + c)).abs().max().item()
    assert err < 1e-10, f"{method} with {steps} steps: constant field not integrated exactly (max error {err:.3g})"


def check_order(make: SolverFactory, method: str, order: int, a: float = -1.3, base_steps: int = 8,
                tolerance: float = 0.6) -> None:
    """Error ratio between ``n`` and ``2n`` steps is at least ``2^order * tolerance`` (and not absurdly more)."""
    x0 = torch.tensor([[1.0], [-0.5]], dtype=torch.float64)
    exact = x0 * math.exp(a)
    errors = []
    for steps in (base_steps, 2 * base_steps, 4 * base_steps):
        out = _run(make(method, steps), CountingField(lambda x, t: a * x), x0)
        errors.append((out.x - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        ratio = coarse / max(fine, 1e-300)
        expected = 2.0 ** order
        assert expected * tolerance <= ratio <= expected / tolerance, (
            f"{method}: error ratio on doubling the steps is {ratio:.2f}, expected about {expected:.0f} "
            f"for a method of order {order} (errors {errors})")


def check_shape_dtype(make: SolverFactory, method: str, steps: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x0 = torch.randn(*shape, dtype=dtype)
    out = _run(make(method, steps), CountingField(lambda x, t: -x), x0)
    assert out.x.shape == x0.shape, f"{method}: output shape {tuple(out.x.shape)} != input shape {tuple(x0.shape)}"
    assert out.x.dtype == x0.dtype, f"{method}: output dtype {out.x.dtype} != input dtype {x0.dtype}"


def check_batch_equals_items(make: SolverFactory, method: str, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5

    def fn(x, t):
        return torch.tanh(x @ w) * (1 + t[:, None])

    whole = _run(make(method, steps), CountingField(fn), x0).x
    for i in range(len(x0)):
        alone = _run(make(method, steps), CountingField(fn), x0[i:i + 1]).x
        err = (alone - whole[i:i + 1]).abs().max().item()
        assert err < 1e-12, f"{method}: solving item {i} alone differs from solving the batch (max {err:.3g})"


def check_nfe(make: SolverFactory, method: str, steps: int, stages: int) -> None:
    field = CountingField(lambda x, t: -x)
    out = _run(make(method, steps), field, torch.ones(2, 2, dtype=torch.float64))
    assert out.nfe == steps * stages, f"{method}: reported nfe {out.nfe}, expected steps x stages = {steps} x {stages}"
    assert field.calls == out.nfe, f"{method}: reported nfe {out.nfe} but the model was called {field.calls} times"


def check_intermediates(make: SolverFactory, method: str, steps: int) -> None:
    x0 = torch.randn(2, 3, dtype=torch.float64)
    out = _run(make(method, steps), CountingField(lambda x, t: -x), x0, intermediates=True)
    assert out.trajectory is not None and out.times is not None, f"{method}: intermediates=True returned no trajectory"
    assert out.trajectory.shape == (steps + 1, *x0.shape), (
        f"{method}: trajectory shape {tuple(out.trajectory.shape)}, expected {(steps + 1, *x0.shape)}")
    assert torch.equal(out.trajectory[0], x0), f"{method}: trajectory does not start at x_init"
    assert torch.equal(out.trajectory[-1], out.x), f"{method}: trajectory does not end at the result"
    assert out.times.shape == (steps + 1,), f"{method}: times shape {tuple(out.times.shape)}, expected ({steps + 1},)"


def check_solver(make: SolverFactory, methods: Mapping[str, tuple[int, int]], steps: tuple[int, ...] = (1, 3, 10)) -> None:
    """Run every check for every method. ``methods = {name: (stages, order)}``."""
    for method, (stages, order) in methods.items():
        for n in steps:
            check_constant_field(make, method, n)
            check_nfe(make, method, n, stages)
        check_order(make, method, order)
        check_shape_dtype(make, method, 4, (2, 3, 2), torch.float32)
        check_shape_dtype(make, method, 4, (5,), torch.float64)
        check_batch_equals_items(make, method, 5)
        check_intermediates(make, method, 4)
