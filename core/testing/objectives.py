"""Conformance checks for objectives: ``loss(models, batch, step) -> (scalar loss, dict of logged values)``.

Give the kit the objective (or a factory making fresh ones), the models and
one batch::

    from core.testing.objectives import check_objective
    check_objective(lambda: registry.build("objective", {"plugin": "mine"}, spec=spec, path=path),
                    {"model": model}, {"x": x}, name="mine")

The invariants, each named in the ``AssertionError`` that reports it:

``returns (loss, logs)``
    ``loss`` returns a 2-tuple of a Tensor and a mapping.
``scalar loss`` / ``finite loss``
    The loss is a 0-d floating tensor, finite.
``logged values are floats``
    Every logged value is finite, keyed by a string, and either a Python ``float``
    (or ``int``), a detached 0-d tensor, a detached 1-D tensor (logged as
    ``key/0`` ... ``key/(n-1)``), or a `core.interfaces.Binned` of detached
    1-D values and positions in [0, 1]. Prefer tensors for values computed on
    the device: the trainer averages them there and reads them once per log
    interval, where ``value.item()`` in the objective synchronises every step.
``gradients reach the model``
    ``loss.backward()`` gives ``models["model"]`` finite gradients, not all zero.
``batch is not modified``
    The batch tensors are unchanged after the call (no in-place edits).
``same seed, same loss``
    Under the same torch seed (and objective state) the loss is the same: all
    randomness comes from the trainer's seeded RNG.
``per-example draws``
    With ``batch["seeds"]`` (as the trainer passes it; the kit adds
    `core.rng.example_seeds` when the batch has none) the loss is the same
    under two different torch seeds: every draw that touches an example comes
    from `core.rng.for_batch(batch)`, so it does not depend on the process
    count or the micro-batch split. ``per_example_draws=False`` skips it.
``state_dict round trip``
    ``state_dict()`` is a mapping that survives ``torch.save`` /
    ``torch.load(weights_only=True)`` (a checkpoint is data, never code);
    after ``load_state_dict`` of a saved state the objective computes the
    same loss as it did right after the state was taken (on a fresh objective
    too, when a factory is given).
``sampling_model``
    ``sampling_model(model)`` is callable as ``field(x, t, y)``; for continuous
    data (``"x"`` a float tensor) it returns a tensor shaped like ``x``.
"""

from __future__ import annotations

import copy
import io
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from core.interfaces import Binned

from .invariants import checking as _checking
from .invariants import require as _require


def _clone_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in batch.items()}


def _same_batch(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    changed = []
    for key, value in a.items():
        other = b.get(key)
        if isinstance(value, Tensor):
            if not isinstance(other, Tensor) or other.shape != value.shape or not torch.equal(other, value):
                changed.append(key)
    return changed


def _roundtrip(state: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _equal_states(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal up to float rounding (a different random draw changes a loss far more than this)."""
    return bool(torch.allclose(a.detach().double(), b.detach().double(), rtol=1e-6, atol=1e-9))


def _model(models: Mapping[str, nn.Module] | nn.Module) -> tuple[dict[str, nn.Module], nn.Module]:
    if isinstance(models, nn.Module):
        return {"model": models}, models
    return dict(models), models["model"]


def check_objective(objective: Any, models: Mapping[str, nn.Module] | nn.Module, batch: Mapping[str, Any], *,
                    name: str | None = None, step: int = 0, seed: int = 0,
                    sampling: bool | None = None, per_example_draws: bool = True) -> None:
    """Run every objective check (see the module docstring).

    Args:
        objective: an Objective, or a factory ``() -> Objective`` (then the state
            round trip is also checked on a fresh objective).
        models: ``{"model": module, ...}`` as the trainer passes it (or the module alone).
        batch: one batch as the data source yields it.
        name: the component's name, for messages.
        step: the step number passed to ``loss``.
        seed: the torch seed used for the reproducibility checks.
        sampling: check ``sampling_model`` on ``batch["x"]``; default: when
            ``batch["x"]`` is a floating tensor.
        per_example_draws: check that a seeded batch's loss ignores torch's global RNG.
    """
    make: Callable[[], Any] | None = None
    if not hasattr(objective, "loss") and callable(objective):
        make = objective
        objective = make()
    who = f"objective {name or type(objective).__name__!r}"
    models, model = _model(models)
    _require(hasattr(objective, "loss"), who, "returns (loss, logs)", f"{type(objective).__name__} has no loss method")
    before = _clone_batch(batch)

    def compute(obj: Any, invariant: str) -> tuple[Tensor, Mapping[str, Any]]:
        return _compute(obj, models, batch, step, seed, who, invariant)

    saved = _check_state(objective, who)  # state before the first call, so the reproducibility checks can rewind
    model.zero_grad(set_to_none=True)
    loss, logs = compute(objective, "scalar loss")
    _check_loss_and_logs(loss, logs, who)
    _check_gradients(loss, model, who)
    changed = _same_batch(before, batch)
    if changed:
        raise AssertionError(f"{who} violates 'batch is not modified': batch[{changed[0]!r}] was modified in place")

    # reproducibility: rewind the state, same seed -> same loss
    with _checking(who, "same seed, same loss"):
        objective.load_state_dict(copy.deepcopy(saved))
    again, _ = compute(objective, "same seed, same loss")
    _require(_same(again, loss), who, "same seed, same loss",
             f"the loss is {again.item()!r} then {loss.item()!r} under the same seed and state "
             f"(draw randomness from torch's global RNG or a generator, and keep all state in state_dict)")
    if per_example_draws:
        _check_per_example_draws(objective, models, batch, saved, who, step, seed)
    if make is not None:
        fresh = make()
        with _checking(who, "state_dict round trip"):
            fresh.load_state_dict(copy.deepcopy(saved))
        other, _ = compute(fresh, "state_dict round trip")
        _require(_same(other, loss), who, "state_dict round trip",
                 f"a fresh objective loaded with the saved state computes {other.item()!r}, not {loss.item()!r}")
    x = batch.get("x")
    if sampling is None:
        sampling = isinstance(x, Tensor) and x.dtype.is_floating_point
    if sampling:
        _check_sampling(objective, model, batch, who)


def _compute(obj: Any, models: Mapping[str, nn.Module], batch: Mapping[str, Any], step: int, seed: int, who: str,
             invariant: str) -> tuple[Tensor, Mapping[str, Any]]:
    """``obj.loss(models, batch, step)`` under torch seed `seed`, checked to be a (Tensor, dict) pair."""
    with torch.random.fork_rng(devices=[]), _checking(who, invariant):
        torch.manual_seed(seed)
        out = obj.loss(models, batch, step)
    _require(isinstance(out, tuple) and len(out) == 2, who, "returns (loss, logs)",
             f"loss() returned {type(out).__name__}, expected a (Tensor, dict) pair")
    loss, logs = out
    _require(isinstance(loss, Tensor), who, "returns (loss, logs)",
             f"the loss is a {type(loss).__name__}, not a Tensor")
    _require(isinstance(logs, Mapping), who, "returns (loss, logs)",
             f"the logs are a {type(logs).__name__}, not a dict")
    return loss, logs


def _check_state(objective: Any, who: str) -> Any:
    """'state_dict round trip': the state survives torch.save / torch.load(weights_only=True); the loaded copy."""
    with _checking(who, "state_dict round trip"):
        state = objective.state_dict()
    _require(isinstance(state, Mapping), who, "state_dict round trip",
             f"state_dict() returned {type(state).__name__}, expected a dict")
    try:
        saved = _roundtrip(copy.deepcopy(dict(state)))
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{who} violates 'state_dict round trip': state_dict() does not survive torch.save / "
                             f"torch.load(weights_only=True) ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                             f"keep it to tensors, numbers, strings, lists and dicts") from None
    _require(_equal_states(dict(state), saved), who, "state_dict round trip",
             "state_dict() changes when saved and loaded with torch.save / torch.load(weights_only=True)")
    return saved


def _check_loss_and_logs(loss: Tensor, logs: Mapping[str, Any], who: str) -> None:
    """'scalar loss', 'finite loss', 'logged values are floats'."""
    _require(loss.ndim == 0, who, "scalar loss", f"the loss has shape {tuple(loss.shape)}, expected a 0-d tensor")
    _require(loss.dtype.is_floating_point, who, "scalar loss", f"the loss has dtype {loss.dtype}")
    _require(bool(torch.isfinite(loss)), who, "finite loss", f"the loss is {loss.item()}")
    for key, value in logs.items():
        _require(isinstance(key, str), who, "logged values are floats", f"log key {key!r} is not a string")
        if isinstance(value, Binned):
            v, pos = value.values, value.positions
            _require(isinstance(v, Tensor) and isinstance(pos, Tensor) and v.ndim == pos.ndim == 1
                     and v.shape == pos.shape and not (v.requires_grad or pos.requires_grad), who,
                     "logged values are floats", f"logs[{key!r}] is a Binned whose values and positions are not "
                     f"detached 1-D tensors of one length")
            _require(isinstance(value.bins, int) and value.bins > 0, who, "logged values are floats",
                     f"logs[{key!r}].bins = {value.bins!r}, expected a positive integer")
            _require(bool(torch.isfinite(v).all()) and bool(((pos >= 0) & (pos <= 1)).all()), who,
                     "logged values are floats", f"logs[{key!r}] has non-finite values or positions outside [0, 1]")
            continue
        if isinstance(value, Tensor):
            _require(value.ndim <= 1 and not value.requires_grad, who, "logged values are floats",
                     f"logs[{key!r}] is a tensor of shape {tuple(value.shape)} (requires_grad={value.requires_grad}); "
                     f"log detached 0-d or 1-D tensors or Python floats")
            _require(bool(torch.isfinite(value).all()), who, "logged values are floats", f"logs[{key!r}] = {value}")
            continue
        else:
            _require(isinstance(value, numbers.Real) and not isinstance(value, bool), who, "logged values are floats",
                     f"logs[{key!r}] is a {type(value).__name__}; log Python floats or detached tensors")
        _require(math.isfinite(float(value)), who, "logged values are floats", f"logs[{key!r}] = {value}")


def _check_gradients(loss: Tensor, model: nn.Module, who: str) -> None:
    """'gradients reach the model': finite, not all zero (the gradients are cleared afterwards)."""
    _require(loss.requires_grad, who, "gradients reach the model", "the loss does not require grad")
    with _checking(who, "gradients reach the model"):
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    _require(bool(grads), who, "gradients reach the model", "no parameter of models['model'] received a gradient")
    _require(all(bool(torch.isfinite(g).all()) for g in grads), who, "gradients reach the model",
             "some gradients are not finite")
    _require(any(bool((g != 0).any()) for g in grads), who, "gradients reach the model", "every gradient is zero")
    model.zero_grad(set_to_none=True)


def _check_sampling(objective: Any, model: nn.Module, batch: Mapping[str, Any], who: str) -> None:
    """'sampling_model': a callable field with ``field(x, t, y).shape == x.shape`` (model in eval mode)."""
    x = batch["x"]
    with _checking(who, "sampling_model"):
        field = objective.sampling_model(model)
    _require(callable(field), who, "sampling_model",
             f"sampling_model returned {type(field).__name__}, not a callable")
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), _checking(who, "sampling_model"):
        out = field(x, t, batch.get("y"))
    model.train(was_training)
    _require(isinstance(out, Tensor) and out.shape == x.shape, who, "sampling_model",
             f"field(x, t, y) returned shape {tuple(getattr(out, 'shape', ()))} for x of shape {tuple(x.shape)}")


def _check_per_example_draws(objective: Any, models: Mapping[str, nn.Module], batch: Mapping[str, Any],
                             saved: Any, who: str, step: int, seed: int) -> None:
    """'per-example draws': a seeded batch gives the same loss under two torch seeds."""
    from .. import rng

    seeded = dict(batch)
    if "seeds" not in seeded:
        size = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))
        seeded["seeds"] = rng.example_seeds(seed, step, torch.arange(size))
    losses = []
    for torch_seed in (seed, seed + 1):
        with _checking(who, "per-example draws"):
            objective.load_state_dict(copy.deepcopy(saved))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch_seed)
                losses.append(objective.loss(models, seeded, step)[0].detach())
    _require(_same(losses[0], losses[1]), who, "per-example draws",
             f"with batch['seeds'] the loss is {losses[0].item()!r} under one torch seed and {losses[1].item()!r} "
             f"under another: draw through core.rng.for_batch(batch) (e.g. draw.randn_like(x, 'noise')), "
             f"not torch's global RNG")
