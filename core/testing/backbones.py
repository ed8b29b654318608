"""Conformance checks for backbones: ``nn.Module``s called as ``model(x, t, y=None)``.

Give the kit a built model and the `DataSpec` it was built for::

    from core.testing.backbones import check_backbone
    check_backbone(registry.build("backbone", {"plugin": "mine"}, spec=spec), spec, name="mine")

The invariants, each named in the ``AssertionError`` that reports it:

``output shape``
    Continuous data: the output is ``(B, *out_shape)`` (default
    ``spec.shape``; pass ``out_shape`` for learned variances). Discrete data:
    logits ``(B, *spec.shape, vocab_size)``. Floating dtype.
``finite output``
    No NaN or infinity, at ``t`` inside (0, 1) and at both ends.
``scalar t``
    A 0-d time tensor means the same time for every item:
    ``model(x, t0) == model(x, t0.expand(B))`` (skip with ``scalar_t=False``).
``items are independent``
    In eval mode item ``i`` of a batch equals the model applied to item ``i``
    alone (no batch statistics leak between examples).
``deterministic in eval mode``
    Two calls in eval mode give the same output whatever the global RNG state.
``time conditions the output``
    Different ``t`` give different outputs.
``gradients reach every parameter``
    Every parameter with ``requires_grad`` receives a finite, non-zero
    gradient from a loss on the output.
``null label works`` / ``labels condition the output``
    When ``spec.num_classes > 0``: ``y = None`` and the null label
    ``y = num_classes`` are accepted, and different labels give different outputs.

The last three run on a copy of the model whose parameters were perturbed
with small noise, so zero-initialised layers (adaLN-Zero, zero output
convolutions) do not hide a broken graph.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.interfaces import DataSpec

from .invariants import checking as _checking
from .invariants import require as _require


def _label(model: nn.Module, name: str | None) -> str:
    return f"backbone {name or type(model).__name__!r}"


def example_inputs(spec: DataSpec, batch_size: int = 3, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, t, y)`` for `spec`: Gaussian (continuous) or token ids (discrete) ``x``,
    ``t (B,)`` in [0.05, 0.95] and class labels ``y (B,)`` (None when unconditional)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, *spec.shape)
    if spec.kind == "discrete":
        x = torch.randint(0, max(1, spec.vocab_size), shape, generator=g)
    else:
        x = torch.randn(shape, generator=g)
    t = 0.05 + 0.9 * torch.rand(batch_size, generator=g)
    y = torch.randint(0, spec.num_classes, (batch_size,), generator=g) if spec.num_classes > 0 else None
    return x.to(device), t.to(device), (y.to(device) if y is not None else None)


def expected_shape(spec: DataSpec, batch_size: int, out_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """The output shape the contract asks for (see the module docstring)."""
    if spec.kind == "discrete":
        return (batch_size, *spec.shape, spec.vocab_size)
    return (batch_size, *(tuple(out_shape) if out_shape is not None else spec.shape))


def perturbed(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """A copy of `model` with Gaussian noise of std `scale` added to every floating parameter."""
    clone = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            if p.dtype.is_floating_point:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return clone


def _close(a: Tensor, b: Tensor, atol: float, rtol: float) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, float("inf")
    diff = (a.double() - b.double()).abs()
    ok = bool(torch.all(diff <= atol + rtol * b.double().abs()))
    return ok, float(diff.max()) if diff.numel() else 0.0


def check_output(model: nn.Module, spec: DataSpec, *, name: str | None = None, batch_size: int = 3,
                 out_shape: Sequence[int] | None = None, device: torch.device | str = "cpu") -> None:
    """``output shape`` and ``finite output`` (inside (0, 1) and at t = 0 and t = 1)."""
    who = _label(model, name)
    x, t, y = example_inputs(spec, batch_size, device=device)
    want = expected_shape(spec, batch_size, out_shape)
    model.eval()
    for label, times in (("t in (0, 1)", t), ("t = 0", torch.zeros_like(t)), ("t = 1", torch.ones_like(t))):
        with torch.no_grad(), _checking(who, "output shape"):
            out = model(x, times, y)
        _require(isinstance(out, Tensor), who, "output shape", f"returned {type(out).__name__}, expected a Tensor")
        _require(tuple(out.shape) == want, who, "output shape",
                 f"output shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; expected {want}")
        _require(out.dtype.is_floating_point, who, "output shape", f"output dtype {out.dtype} is not floating point")
        _require(bool(torch.isfinite(out).all()), who, "finite output", f"non-finite output at {label}")


def check_scalar_time(model: nn.Module, spec: DataSpec, *, name: str | None = None, batch_size: int = 3,
                      atol: float = 1e-6, rtol: float = 1e-5, device: torch.device | str = "cpu") -> None:
    """``scalar t``: a 0-d time equals the same time expanded to ``(B,)``."""
    who = _label(model, name)
    x, _, y = example_inputs(spec, batch_size, device=device)
    t0 = torch.tensor(0.3, device=device)
    model.eval()
    with torch.no_grad(), _checking(who, "scalar t"):
        scalar = model(x, t0, y)
        batched = model(x, t0.expand(batch_size), y)
    ok, err = _close(scalar, batched, atol, rtol)
    _require(ok, who, "scalar t",
             f"model(x, 0-d t) differs from model(x, t expanded to (B,)) (max difference {err:.3g})")


def check_items_independent(model: nn.Module, spec: DataSpec, *, name: str | None = None, batch_size: int = 3,
                            atol: float = 1e-5, rtol: float = 1e-4, device: torch.device | str = "cpu") -> None:
    """``items are independent``: in eval mode, item i of the batch output equals the model on item i alone."""
    who = _label(model, name)
    x, t, y = example_inputs(spec, batch_size, seed=1, device=device)
    model.eval()
    with torch.no_grad(), _checking(who, "items are independent"):
        whole = model(x, t, y)
        for i in range(batch_size):
            alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1] if y is not None else None)
            ok, err = _close(alone, whole[i:i + 1], atol, rtol)
            _require(ok, who, "items are independent",
                     f"in eval mode, item {i} computed alone differs from item {i} of the batch "
                     f"(max difference {err:.3g})")


def check_eval_determinism(model: nn.Module, spec: DataSpec, *, name: str | None = None, batch_size: int = 3,
                           device: torch.device | str = "cpu") -> None:
    """``deterministic in eval mode``: the same inputs give the same output, whatever the global RNG state."""
    who = _label(model, name)
    x, t, y = example_inputs(spec, batch_size, seed=2, device=device)
    model.eval()
    with torch.no_grad(), _checking(who, "deterministic in eval mode"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        a = model(x, t, y)
        torch.manual_seed(2)
        b = model(x, t, y)
    if not (a.shape == b.shape and torch.equal(a, b)):
        _, err = _close(a, b, 0.0, 0.0)
        raise AssertionError(f"{who} violates 'deterministic in eval mode': two calls in eval mode differ "
                             f"(max difference {err:.3g}); is dropout or noise active outside training?")


def check_time_conditioning(model: nn.Module, spec: DataSpec, *, name: str | None = None, batch_size: int = 3,
                            device: torch.device | str = "cpu") -> None:
    """``time conditions the output`` (on a perturbed copy)."""
    who = _label(model, name)
    probe = perturbed(model).eval()
    x, _, y = example_inputs(spec, batch_size, seed=3, device=device)
    with torch.no_grad(), _checking(who, "time conditions the output"):
        a = probe(x, torch.full((batch_size,), 0.2, device=device), y)
        b = probe(x, torch.full((batch_size,), 0.8, device=device), y)
    _require(not torch.allclose(a, b), who, "time conditions the output",
             "the output at t = 0.2 equals the output at t = 0.8: the model ignores t")


def check_gradients(model: nn.Module, spec: DataSpec, *, name: str | None = None, batch_size: int = 3,
                    device: torch.device | str = "cpu") -> None:
    """``gradients reach every parameter`` (on a perturbed copy, in train mode)."""
    who = _label(model, name)
    probe = perturbed(model).train()
    x, t, y = example_inputs(spec, batch_size, seed=4, device=device)
    if y is not None:  # exercise the null label too
        y = y.clone()
        y[0] = spec.num_classes
    with _checking(who, "gradients reach every parameter"):
        out = probe(x, t, y)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device, out.dtype)
        (out * weights).sum().backward()
    missing, zero, bad = [], [], []
    for pname, p in probe.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(pname)
        elif not bool(torch.isfinite(p.grad).all()):
            bad.append(pname)
        elif not bool((p.grad != 0).any()):
            zero.append(pname)
    _require(not missing, who, "gradients reach every parameter",
             f"no gradient reaches {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} "
             f"(unused parameters? set requires_grad=False or remove them)")
    _require(not bad, who, "gradients reach every parameter", f"non-finite gradients in {', '.join(bad[:8])}")
    _require(not zero, who, "gradients reach every parameter",
             f"the gradient of {', '.join(zero[:8])} is exactly zero{' ...' if len(zero) > 8 else ''}")


def check_labels(model: nn.Module, spec: DataSpec, *, name: str | None = None, batch_size: int = 3,
                 device: torch.device | str = "cpu") -> None:
    """``null label works`` and ``labels condition the output`` (class-conditional specs only)."""
    if spec.num_classes <= 0:
        return
    who = _label(model, name)
    x, t, _ = example_inputs(spec, batch_size, seed=6, device=device)
    null = torch.full((batch_size,), spec.num_classes, dtype=torch.long, device=device)
    model.eval()
    with torch.no_grad(), _checking(who, "null label works"):
        with_null = model(x, t, null)
        with_none = model(x, t, None)
    for label, out in (("y = num_classes (the null label)", with_null), ("y = None", with_none)):
        _require(isinstance(out, Tensor) and bool(torch.isfinite(out).all()), who, "null label works",
                 f"{label} gives a non-finite output")
    probe = perturbed(model).eval()
    with torch.no_grad(), _checking(who, "labels condition the output"):
        a = probe(x, t, torch.zeros(batch_size, dtype=torch.long, device=device))
        b = probe(x, t, null)
    _require(not torch.allclose(a, b), who, "labels condition the output",
             "class 0 and the null label give the same output: the model ignores y")


def check_backbone(model: nn.Module, spec: DataSpec, *, name: str | None = None, batch_size: int = 3,
                   out_shape: Sequence[int] | None = None, scalar_t: bool = True,
                   atol: float = 1e-5, rtol: float = 1e-4, device: torch.device | str = "cpu") -> None:
    """Run every backbone check (see the module docstring). ``model`` must be an ``nn.Module``."""
    who = _label(model, name) if isinstance(model, nn.Module) else f"backbone {name!r}"
    _require(isinstance(model, nn.Module), who, "is an nn.Module", f"the factory returned {type(model).__name__}")
    was_training = model.training
    try:
        check_output(model, spec, name=name, batch_size=batch_size, out_shape=out_shape, device=device)
        if scalar_t:
            check_scalar_time(model, spec, name=name, batch_size=batch_size, device=device)
        check_items_independent(model, spec, name=name, batch_size=batch_size, atol=atol, rtol=rtol, device=device)
        check_eval_determinism(model, spec, name=name, batch_size=batch_size, device=device)
        check_time_conditioning(model, spec, name=name, batch_size=batch_size, device=device)
        check_gradients(model, spec, name=name, batch_size=batch_size, device=device)
        check_labels(model, spec, name=name, batch_size=batch_size, device=device)
    finally:
        model.train(was_training)
