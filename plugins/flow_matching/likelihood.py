"""Exact log-likelihoods of continuous normalising flows (the instantaneous change of variables).

For ``dx/dt = u(x, t)`` carrying ``p_0`` (standard Gaussian) at t=0 to ``p_1`` at t=1,

    log p_1(x_1) = log p_0(x_0) - int_0^1 div u(x_t, t) dt,

where ``x_t`` solves the ODE backwards from ``x_1`` (Chen et al. 2018; Grathwohl
et al. 2019). The state ``[x, L]`` with ``dL/dt = div u`` and ``L(1) = 0`` is
integrated from t=1 to t=0, so ``log p_1(x_1) = log p_0(x_0) + L(0)``.

The divergence is exact (one backward pass per data dimension: small
dimensions) or Hutchinson's unbiased estimate ``z^T (du/dx) z`` with Rademacher
or Gaussian probes ``z`` drawn once per sample and held fixed along the
trajectory (FFJORD), averaged over ``num_probes`` probes.

`log_likelihood` is a function (differentiable with ``grad=True``, e.g. for
likelihood training or gradients with respect to ``x_1``); `LikelihoodMetric`
is the ``likelihood`` metric plugin (a ModelMetric).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from core.interfaces import DataSource, DataSpec, Field
from core.nn import model_device
from core.validate import non_negative, positive
from registry import ConfigError

from .path import AffinePath
from .solver import ADAPTIVE, STAGES, integrate_adaptive, integrate_fixed


@attrs.frozen
class LikelihoodResult:
    """Per-sample results of `log_likelihood` (all ``(B,)`` unless noted).

    Attributes:
        log_prob: ``log p_1(x_1)`` in nats.
        bits_per_dim: ``-log p_1(x_1) / (D ln 2)``.
        log_p0: ``log p_0(x_0)`` of the source point reached.
        delta_log_p: ``-int_0^1 div u dt`` (the change of log-density along the path).
        x_0: the source point ``(B, ...)``.
        nfe: number of evaluations of the field (each with its divergence).
    """

    log_prob: Tensor
    bits_per_dim: Tensor
    log_p0: Tensor
    delta_log_p: Tensor
    x_0: Tensor
    nfe: int


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` summed over all but the batch dimension: ``(B, ...) -> (B,)``."""
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * (flat * flat).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def draw_probes(shape: tuple[int, ...], num: int, kind: str, generator: torch.Generator | None,
                dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``num`` probe vectors ``(num, *shape)`` with ``E[z z^T] = I`` (Rademacher or Gaussian)."""
    gdev = generator.device if generator is not None else "cpu"
    if kind == "rademacher":
        z = torch.randint(0, 2, (num, *shape), generator=generator, device=gdev).to(dtype) * 2 - 1
    elif kind == "gaussian":
        z = torch.randn((num, *shape), generator=generator, device=gdev, dtype=dtype)
    else:
        raise ValueError(f"unknown probe {kind!r}; expected rademacher or gaussian")
    return z.to(device)


def divergence(field: Field, x: Tensor, t: Tensor, y: Tensor | None = None, *, probes: Tensor | None = None,
               create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """``(u(x, t), div u)`` with ``u (B, ...)`` and ``div (B,)``.

    Exact (``probes=None``: one vector-Jacobian product per dimension) or the
    Hutchinson estimate averaged over ``probes (P, B, ...)``. With
    ``create_graph`` both outputs stay differentiable.
    """
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        u = field(x, t, y)
        batch = x.shape[0]
        if probes is None:
            flat = u.reshape(batch, -1)
            div = torch.zeros(batch, dtype=u.dtype, device=u.device)
            for i in range(flat.shape[1]):
                (g,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
                div = div + g.reshape(batch, -1)[:, i]
        else:
            div = torch.zeros(batch, dtype=u.dtype, device=u.device)
            for z in probes:
                (g,) = torch.autograd.grad((u * z).sum(), x, create_graph=create_graph, retain_graph=True)
                div = div + (g * z).reshape(batch, -1).sum(1)
            div = div / probes.shape[0]
    if not create_graph:
        u, div = u.detach(), div.detach()
    return u, div


def log_likelihood(field: Field, x_1: Tensor, *, y: Tensor | None = None, method: str = "dopri5", steps: int = 32,
                   atol: float = 1e-5, rtol: float = 1e-5, estimator: Literal["exact", "hutchinson"] = "exact",
                   probe: Literal["rademacher", "gaussian"] = "rademacher", num_probes: int = 1,
                   generator: torch.Generator | None = None, t0: float = 0.0, t1: float = 1.0,
                   grad: bool = False) -> LikelihoodResult:
    """``log p_1(x_1)`` per sample under the velocity field ``field(x, t, y)``; see the module docstring.

    Args:
        field: the velocity field (``objective.sampling_model(model)``).
        x_1: data points ``(B, ...)``.
        y: class labels ``(B,)`` for a class-conditional field (then ``log p(x_1 | y)``).
        method: euler, midpoint, heun, rk4 (``steps`` fixed steps) or dopri5, dopri8 (``atol``, ``rtol``).
        estimator: "exact" divergence or "hutchinson".
        probe, num_probes: Hutchinson probe distribution and number of probes per sample.
        generator: draws the probes.
        t0, t1: integrate from ``t1`` back to ``t0`` (the source density is used at ``t0``).
        grad: keep the computation differentiable (w.r.t. ``x_1`` and the field's parameters).
    """
    if estimator not in ("exact", "hutchinson"):
        raise ValueError(f"unknown estimator {estimator!r}")
    batch, shape = x_1.shape[0], tuple(x_1.shape[1:])
    dim = math.prod(shape)
    probes = None
    if estimator == "hutchinson":
        probes = draw_probes((batch, *shape), num_probes, probe, generator, x_1.dtype, x_1.device)
    calls = [0]

    def augmented(state: Tensor, t: Tensor, yy: Tensor | None) -> Tensor:
        calls[0] += 1
        x = state[:, :dim].reshape(batch, *shape)
        u, div = divergence(field, x, t, yy, probes=probes, create_graph=grad)
        return torch.cat([u.reshape(batch, dim).to(state.dtype), div[:, None].to(state.dtype)], dim=1)

    start = torch.cat([x_1.reshape(batch, dim), torch.zeros(batch, 1, dtype=x_1.dtype, device=x_1.device)], dim=1)
    context = torch.enable_grad() if grad else torch.no_grad()
    with context:
        if method in STAGES:
            grid = torch.linspace(t1, t0, steps + 1, dtype=x_1.dtype, device=x_1.device)
            end, _ = integrate_fixed(augmented, start, grid, method, y)
        elif method in ADAPTIVE:
            grid = torch.tensor([t1, t0], dtype=x_1.dtype, device=x_1.device)
            states, _ = integrate_adaptive(augmented, start, grid, method, y, atol=atol, rtol=rtol)
            end = states[-1]
        else:
            raise ValueError(f"unknown method {method!r}")
    x_0 = end[:, :dim].reshape(batch, *shape)
    delta = end[:, dim]
    log_p0 = standard_normal_log_prob(x_0)
    log_prob = log_p0 + delta
    return LikelihoodResult(log_prob=log_prob, bits_per_dim=-log_prob / (dim * math.log(2.0)), log_p0=log_p0,
                            delta_log_p=delta, x_0=x_0, nfe=calls[0])


# --------------------------------------------------------------------------- the metric plugin
@attrs.define
class LikelihoodConfig:
    """Options of the likelihood metric (negative log-likelihood of held-out data).

    Attributes:
        scheduler: the scheduler the model was trained with (a name or a table {plugin = ..., ...});
            used to convert epsilon / x1 predictions to velocities. Inside a run (the runner and
            ``flowforge eval``) leave it unset: the metric integrates the run's own objective and path;
            a value that contradicts them is refused. Unset outside a run: cond_ot.
        prediction: what the model predicts: velocity, epsilon or x1 (unset: the run's objective's;
            velocity outside a run). A value that contradicts the run's objective is refused.
        estimator: "exact" divergence, "hutchinson", or "auto" (exact up to exact_max_dim dimensions).
        exact_max_dim: largest data dimension for which "auto" uses the exact divergence.
        probe: Hutchinson probes: rademacher or gaussian.
        num_probes: Hutchinson probes per sample.
        method: ODE method (dopri5, dopri8 adaptive; euler, midpoint, heun, rk4 fixed).
        steps: steps of a fixed-step method.
        atol: absolute tolerance of an adaptive method.
        rtol: relative tolerance of an adaptive method.
        num_samples: held-out examples evaluated.
        batch_size: examples per integration.
        dtype: arithmetic precision (float64 runs a float64 copy of the model).
        sampling_eps: how far from the singular end an epsilon / x1 model is evaluated.
        name: the key of this metric in summaries (default: the plugin name).
        dequantize: score uniformly dequantised b-bit levels and report bpd on the literature's scale
            (dequantize.py: E_u[-log p(x~)] / (D ln 2) + b - 1); nll stays in nats of x~ in [-1, 1].
        bits: bits per level of the images (8: data scaled v / 127.5 - 1).
    """

    scheduler: str | dict[str, Any] | None = None
    prediction: Literal["velocity", "epsilon", "x1"] | None = None
    estimator: Literal["auto", "exact", "hutchinson"] = "auto"
    exact_max_dim: int = 16
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    num_probes: int = 1
    method: Literal["euler", "midpoint", "heun", "rk4", "dopri5", "dopri8"] = "dopri5"
    steps: int = 32
    atol: float = 1e-5
    rtol: float = 1e-5
    num_samples: int = 1000
    batch_size: int = 500
    dtype: Literal["float32", "float64"] = "float32"
    sampling_eps: float = 1e-3
    name: str = ""
    dequantize: bool = False
    bits: int = 8

    def __attrs_post_init__(self) -> None:
        for key in ("num_probes", "steps", "num_samples", "batch_size", "bits"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)}", (key,))
        positive(self, "atol", "rtol")
        non_negative(self, "sampling_eps")


def build_scheduler(spec: str | dict[str, Any], key: str = "scheduler"):
    """A scheduler built through the registry from a plugin name or a table."""
    import registry

    mapping = {"plugin": spec} if isinstance(spec, str) else dict(spec)
    try:
        return registry.build("scheduler", mapping)
    except ConfigError as exc:
        raise exc.within(key) from None


def velocity_field(model: nn.Module, path: AffinePath, prediction: str, eps: float = 1e-3) -> Field:
    """`model` as a velocity field (converting an epsilon or x1 prediction)."""
    if prediction == "velocity":
        return model
    from .transforms import PredictionToVelocity

    return PredictionToVelocity(model, path, prediction, eps)


class LikelihoodMetric:
    """The ``likelihood`` ModelMetric: ``evaluate(model, data, generator)`` returns

    ``nll`` (mean nats per example), ``nll_per_dim``, ``bpd`` (mean bits per
    dimension, of the data as the data source scales it; with ``dequantize`` of
    the dequantised levels on the literature's scale, dequantize.py),
    ``bpd_stderr`` and ``nfe`` (field evaluations per batch, adaptive methods).
    """

    higher_is_better = False

    def __init__(self, config: LikelihoodConfig, spec: DataSpec | None = None, objective: Any = None):
        self.config, self.spec = config, spec
        if spec is not None and spec.kind != "continuous":
            raise ConfigError(f"the likelihood metric is for continuous data; this data is {spec.kind!r}")
        self.objective = objective if hasattr(objective, "sampling_model") else None
        if self.objective is not None:
            check_matches_run(config, self.objective)
            self.path = self.objective.path
        else:
            self.path = AffinePath(build_scheduler(config.scheduler or "cond_ot"))

    def field(self, net: nn.Module) -> Field:
        """The velocity field integrated: the run's objective's sampling field, or the configured conversion."""
        if self.objective is not None:
            return self.objective.sampling_model(net)
        return velocity_field(net, self.path, self.config.prediction or "velocity", self.config.sampling_eps)

    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator) -> dict[str, float]:
        c = self.config
        ref = data.reference(c.num_samples, generator)
        x_all, y_all = ref["x"], ref.get("y")
        if data.spec.num_classes <= 0:
            y_all = None
        if c.dequantize:
            from .dequantize import dequantize, to_levels

            u = torch.rand(x_all.shape, generator=generator, dtype=torch.float64)
            x_all = dequantize(to_levels(x_all, c.bits), u, c.bits, x_all.dtype)
        dim = math.prod(x_all.shape[1:])
        estimator = c.estimator if c.estimator != "auto" else ("exact" if dim <= c.exact_max_dim else "hutchinson")
        dtype = torch.float64 if c.dtype == "float64" else torch.float32
        net = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
        was_training = net.training
        net.eval()
        device = model_device(net)
        field = self.field(net)
        logps, nfes = [], []
        for start in range(0, len(x_all), c.batch_size):
            x = x_all[start:start + c.batch_size].to(device=device, dtype=dtype)
            y = y_all[start:start + c.batch_size].to(device) if y_all is not None else None
            res = log_likelihood(field, x, y=y, method=c.method, steps=c.steps, atol=c.atol, rtol=c.rtol,
                                 estimator=estimator, probe=c.probe, num_probes=c.num_probes, generator=generator)
            logps.append(res.log_prob.double().cpu())
            nfes.append(res.nfe)
        net.train(was_training)
        logp = torch.cat(logps)
        if c.dequantize:
            from .dequantize import dequantized_bits_per_dim

            bpd = dequantized_bits_per_dim(logp, dim, c.bits)
        else:
            bpd = -logp / (dim * math.log(2.0))
        n = len(logp)
        return {"nll": float(-logp.mean()), "nll_per_dim": float(-logp.mean() / dim), "bpd": float(bpd.mean()),
                "bpd_stderr": float(bpd.std() / math.sqrt(n)) if n > 1 else 0.0,
                "nfe": float(sum(nfes) / len(nfes))}


def check_matches_run(config: Any, objective: Any, metric: str = "likelihood") -> None:
    """Refuse a ``config.scheduler`` / ``config.prediction`` that contradicts the run's objective and path (a
    likelihood of an epsilon model integrated as a velocity field is a number, but not this model's likelihood)."""
    run_path = getattr(objective, "path", None)
    if not isinstance(run_path, AffinePath):
        raise ConfigError(f"the {metric} metric integrates a flow-matching velocity field; this run's objective "
                          f"{type(objective).__name__} has no affine [path] (use the family's own metric, e.g. ddpm_bpd)")
    trained = getattr(objective, "prediction", None) or "velocity"
    if config.prediction is not None and config.prediction != trained:
        raise ConfigError(f"prediction = {config.prediction!r}, but this run's objective predicts {trained!r}; "
                          f"leave it unset to use the run's", ("prediction",))
    if config.scheduler is not None:
        mine, theirs = build_scheduler(config.scheduler), run_path.scheduler
        if type(mine) is not type(theirs) or getattr(mine, "config", None) != getattr(theirs, "config", None):
            raise ConfigError(f"scheduler = {config.scheduler!r} is not this run's scheduler "
                              f"({type(theirs).__name__}); leave it unset to use the run's", ("scheduler",))


def make_likelihood(config: LikelihoodConfig, spec: DataSpec | None = None, objective: Any = None) -> LikelihoodMetric:
    """Metric factory for ``plugin = "likelihood"``; inside a run it receives the run's `objective`."""
    return LikelihoodMetric(config, spec, objective)
