r"""Metrics of discrete flow models: the likelihood bound, infilling, and dequantised sample distances.

``discrete_elbo`` — a bound on the negative log-likelihood per token
=====================================================================

The trained model defines a CTMC: from ``x_0 ~ p_0`` it jumps with the
rates ``u^theta_t(x^i, z) = lambda_t p^theta_{1|t}(x^i | z)`` (``x^i != z^i``,
``lambda_t = kappa'_t / (1 - kappa_t)``), and its state at ``t = 1`` has some law
``p^theta_1``. For a data point ``x_1`` the *reference* process that starts
from ``x_0 ~ p_0`` and lets each position jump to ``x_1^i`` at rate
``lambda_t`` (while it differs) has the marginals ``p_t(. | x_1)`` of the
mixture path (a position has not jumped by ``t`` with probability
``exp(-int_0^t lambda) = 1 - kappa_t``) and ends at ``x_1``. Both processes
start from ``p_0``, so by the data-processing inequality and Girsanov's
formula for jump processes (Campbell et al. 2022; Shaul et al. 2024)

    -log p^theta_1(x_1) <= KL(reference path || model path)
        = int_0^1 E_{x_t ~ p_t(.|x_1)} sum_i D(u_t(., x_t | x_1) || u^theta_t(., x_t)) dt

where ``D(a || b) = sum_{x != z^i} a(x) log(a(x) / b(x)) - a(x) + b(x)`` is the
generalized KL between rate vectors (`path.rate_divergence`). The same
bound holds for any path whose conditional process starts from the model's
source and ends at ``x_1``; each path computes its integrand
(`DiscretePath.generalized_kl`; the metric-induced path of
`plugins.discrete_flow.metric_path` from its rates). For the mixture path
it is the training loss of `plugins.discrete_flow.objective`:

    D = lambda_t * (delta_i - p^theta(x_t^i) - (1 - delta_i) log p^theta(x_1^i)),  delta_i = [x_t^i = x_1^i]

(with the mask source and carry-over this is the masked-diffusion bound
``int lambda_t E sum_{i masked} -log p^theta(x_1^i | x_t) dt``). At the exact
posterior the integrand stays bounded as ``t -> 1``: a position still differs
from ``x_1^i`` with probability ``O(1 - kappa_t)``, and the posterior of a
correct token approaches 1 at that rate. A model that does not learn this pays
in the bound (with the uniform source, ``lambda_t (1 - p^theta(x_t^i))`` on correct
tokens is not integrable if ``p^theta`` stays below 1), which is also where most of
the estimator's variance comes from; with the mask source and carry-over
those terms vanish. ``t ~ U[0, 1)`` needs no clipping. The metric
estimates the integral with ``times`` stratified draws per held-out example
(``t_k = (k + u_k) / times``), divides by the number of positions, and
reports ``nats_per_token``, ``bits_per_token`` (bits per character for text,
bits per dimension for images) and the standard error of the latter over
examples. With class labels it bounds ``-log p(x | y)``. It bounds the
likelihood of the exact continuous-time sampler without the
divergence-free term (a finite-step Euler sampler is an approximation of it).

Which process is bounded depends on the path (source and scheduler), so
the metric needs it: metrics are not handed the experiment's ``[path]``, so
``path`` and ``scheduler`` options name it (the same tables as the experiment's
sections). A future runner that passes ``path`` to metrics makes them optional.

``discrete_infill`` — infilling held-out data
=============================================

Hides a fraction ``span`` of each held-out example (a contiguous span
for 1D sequences, random positions otherwise), fills it in with the
discrete Euler solver holding every other position fixed, and reports the
fraction of hidden tokens restored exactly (``accuracy``). When the data
source can ``decode`` examples to text and ``attach`` text to its pictures
(the ``text`` source), it also leaves ``examples`` infilling examples there,
which its ``render`` writes next to the samples (metrics have no run
directory of their own).

``dequantized`` — a sample metric on bin centres
================================================

Wraps a continuous sample metric (``energy_distance``, ``sliced_wasserstein``)
for data quantised into bins (``toy2d_discrete``): token ``k`` of a coordinate
becomes its bin centre ``low + (k + 1/2) (high - low) / bins`` before the
wrapped metric sees it, so the numbers are in the units of the continuous data.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor, nn

import registry
from core.interfaces import DataSource, DataSpec
from core.nn import evaluating
from registry import ConfigError

from .path import DiscretePath, uniform
from .solver import DiscreteEulerConfig, DiscreteEulerSolver


def _resolved(kind: str, key: str, mapping: dict[str, Any] | None) -> dict[str, Any] | None:
    if mapping is None:
        return None
    try:
        return registry.resolved(kind, mapping)
    except ConfigError as exc:
        raise exc.within(key) from None


@attrs.define
class PathOptions:
    """The discrete path a metric evaluates the model on.

    Attributes:
        path: the path table, e.g. { plugin = "mixture_discrete", source = "mask" } (as in [path]).
        scheduler: the scheduler table, e.g. { plugin = "polynomial", n = 1.0 } (as in [scheduler]).
    """

    path: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None

    def __attrs_post_init__(self) -> None:
        self.path = _resolved("path", "path", self.path)
        self.scheduler = _resolved("scheduler", "scheduler", self.scheduler)

    def build_path(self, spec: DataSpec, path: Any = None) -> DiscretePath:
        """The configured path, else the one passed in (`path`), else a ConfigError."""
        if self.path is not None:
            scheduler = None
            if self.scheduler is not None:
                try:
                    scheduler = registry.build("scheduler", self.scheduler, spec=spec)
                except ConfigError as exc:
                    raise exc.within("scheduler") from None
            try:
                path = registry.build("path", self.path, spec=spec, scheduler=scheduler)
            except ConfigError as exc:
                raise exc.within("path") from None
        if not isinstance(path, DiscretePath):
            raise ConfigError("this metric needs the discrete path the model was trained on: set "
                              "path = { plugin = \"mixture_discrete\", ... } and scheduler = { plugin = ..., ... } "
                              "(or path = { plugin = \"metric_discrete\", ... }) "
                              "(the same tables as the experiment's [path] and [scheduler])", ("path",))
        return path


# --------------------------------------------------------------------------- the likelihood bound
@attrs.define
class ELBOConfig(PathOptions):
    """Options of the discrete_elbo metric (and, inherited, path and scheduler).

    Attributes:
        num_examples: held-out examples the bound is averaged over.
        times: stratified time draws per example.
        batch_size: examples per model call (times x batch_size rows).
    """

    num_examples: int = 1000
    times: int = 8
    batch_size: int = 256

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key in ("num_examples", "times", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)!r}", (key,))


@torch.no_grad()
def nll_bound(model: nn.Module, path: DiscretePath, x_1: Tensor, y: Tensor | None, times: int,
              generator: torch.Generator) -> Tensor:
    """Per-example upper bound on ``-log p(x_1)`` in nats ``(B,)`` (module doc), from ``x_1 (B, ...)``."""
    b = x_1.shape[0]
    k = torch.arange(times, dtype=torch.float64).repeat(b)
    t = ((k + uniform((b * times,), generator, "cpu").double()) / times).to(x_1.device)
    x_1r = x_1.repeat_interleave(times, dim=0)
    y_r = y.repeat_interleave(times, dim=0) if y is not None else None
    x_0 = path.sample_source(x_1r.shape, generator=generator, device=x_1.device)
    x_t = path.sample(x_0, x_1r, t, generator=generator).x_t
    log_p = path.log_posterior(model(x_t, t.float(), y_r), x_t, t).double()
    terms = path.generalized_kl(log_p, x_1r, x_t, t)
    return terms.reshape(b, times, -1).sum(-1).mean(-1)


class DiscreteELBO:
    """The ``discrete_elbo`` model metric (module doc)."""

    def __init__(self, config: ELBOConfig, path: DiscretePath):
        self.config, self.path = config, path

    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator) -> dict[str, float]:
        c = self.config
        with evaluating(model) as device:
            ref = data.reference(c.num_examples, generator)
            bounds = []
            for start in range(0, c.num_examples, c.batch_size):
                x = ref["x"][start:start + c.batch_size].to(device)
                y = ref["y"][start:start + c.batch_size].to(device) if "y" in ref else None
                bounds.append(nll_bound(model, self.path, x, y, c.times, generator).cpu())
        per_token = torch.cat(bounds) / math.prod(ref["x"].shape[1:])
        nats = per_token.mean().item()
        stderr = per_token.std().item() / math.sqrt(len(per_token)) if len(per_token) > 1 else float("nan")
        return {"nats_per_token": nats, "bits_per_token": nats / math.log(2),
                "bits_per_token_stderr": stderr / math.log(2)}


def make_discrete_elbo(config: ELBOConfig, spec: DataSpec, path: Any = None) -> DiscreteELBO:
    """Metric factory for ``plugin = "discrete_elbo"``."""
    return DiscreteELBO(config, config.build_path(spec, path))


# --------------------------------------------------------------------------- infilling
@attrs.define
class InfillConfig(PathOptions):
    """Options of the discrete_infill metric (and, inherited, path and scheduler).

    Attributes:
        span: fraction of each example's positions hidden and infilled.
        num_examples: held-out examples infilled.
        steps: discrete Euler steps.
        div_free: divergence-free coefficient of the solver (a number or "sym").
        examples: infilling examples handed to the data source to write (when it can).
    """

    span: float = 0.25
    num_examples: int = 256
    steps: int = 64
    div_free: float | str = 0.0
    examples: int = 8

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not 0.0 < self.span < 1.0:
            raise ConfigError(f"expected a fraction in (0, 1), got {self.span!r}", ("span",))
        DiscreteEulerConfig(steps=self.steps, div_free=self.div_free)  # validates both


def hidden_positions(shape: tuple[int, ...], span: float, generator: torch.Generator) -> Tensor:
    """BoolTensor ``shape = (B, ...)``: for ``(B, L)`` one contiguous span of ``round(span L)``
    positions per row at a random offset; otherwise each position with probability ``span``."""
    if len(shape) == 2:
        b, n = shape
        m = min(n - 1, max(1, round(span * n)))
        start = torch.randint(0, n - m + 1, (b, 1), generator=generator)
        pos = torch.arange(n).unsqueeze(0)
        return (pos >= start) & (pos < start + m)
    return torch.rand(shape, generator=generator) < span


class Infill:
    """The ``discrete_infill`` model metric (module doc)."""

    def __init__(self, config: InfillConfig, path: DiscretePath):
        self.config, self.path = config, path
        self.solver = DiscreteEulerSolver(DiscreteEulerConfig(steps=config.steps, div_free=config.div_free), path)

    def evaluate(self, model: nn.Module, data: DataSource, generator: torch.Generator) -> dict[str, float]:
        c = self.config
        with evaluating(model) as device:
            ref = data.reference(c.num_examples, generator)
            x_1 = ref["x"]
            hidden = hidden_positions(tuple(x_1.shape), c.span, generator)
            x_init = torch.where(hidden, self.path.sample_source(x_1.shape, generator=generator), x_1)
            y = ref["y"].to(device) if "y" in ref else None
            filled = self.solver.sample(model, x_init.to(device), y=y, generator=generator,
                                        known=(~hidden).to(device)).x.cpu()
        if c.examples and hasattr(data, "decode") and hasattr(data, "attach"):
            data.attach("infill", self.format_examples(data, x_1, filled, hidden))
        return {"accuracy": (filled == x_1)[hidden].float().mean().item()}

    def format_examples(self, data: Any, x_1: Tensor, filled: Tensor, hidden: Tensor) -> str:
        """Text of the first ``examples`` infillings: what was given (hidden positions blanked),
        the infilled and the original example, with the hidden positions marked by ``data.decode``."""
        lines = [f"# infilling: {self.config.span:.0%} of each held-out example hidden, filled by "
                 f"{self.config.steps} discrete Euler steps; the rest held fixed", ""]
        for i in range(min(self.config.examples, len(x_1))):
            lines += [f"===== example {i} =====",
                      "--- given ---", data.decode(x_1[i], hidden=hidden[i], blank=True),
                      "--- infilled ---", data.decode(filled[i], hidden=hidden[i]),
                      "--- original ---", data.decode(x_1[i], hidden=hidden[i]), ""]
        return "\n".join(lines)


def make_discrete_infill(config: InfillConfig, spec: DataSpec, path: Any = None) -> Infill:
    """Metric factory for ``plugin = "discrete_infill"``."""
    return Infill(config, config.build_path(spec, path))


# --------------------------------------------------------------------------- dequantised sample metrics
@attrs.define
class DequantizedConfig:
    """Options of the dequantized metric.

    Attributes:
        metric: the wrapped sample metric, e.g. { plugin = "energy_distance" }.
        name: the summary key (default: "dequantized"); e.g. "energy_distance" to line up with a
            continuous experiment's summary.
    """

    metric: dict[str, Any]
    name: str | None = None

    def __attrs_post_init__(self) -> None:
        self.metric = _resolved("metric", "metric", self.metric)


class Dequantized:
    """A sample metric on bin centres (module doc); ``update``/``compute``/``reset`` delegate."""

    def __init__(self, inner: Any, low: float, high: float, bins: int):
        self.inner, self.low, self.width = inner, float(low), (float(high) - float(low)) / bins
        self.higher_is_better = inner.higher_is_better

    def centres(self, tokens: Tensor) -> Tensor:
        """Token ids ``(N, ...)`` -> float64 bin centres ``(N, ...)``."""
        return self.low + (tokens.double() + 0.5) * self.width

    def update(self, samples: Tensor, real: bool) -> None:
        self.inner.update(self.centres(samples), real=real)

    def compute(self) -> Any:
        return self.inner.compute()

    def reset(self) -> None:
        self.inner.reset()


def make_dequantized(config: DequantizedConfig, spec: DataSpec, data: DataSource) -> Dequantized:
    """Metric factory for ``plugin = "dequantized"``: needs ``spec.extra["bin_low"]``/``["bin_high"]``."""
    if "bin_low" not in spec.extra or "bin_high" not in spec.extra:
        raise ConfigError("dequantized needs quantised data that declares its bins "
                          "(spec.extra bin_low / bin_high, e.g. the toy2d_discrete source)", ("plugin",))
    bins = spec.vocab_size - ("mask_token" in spec.extra)
    continuous = attrs.evolve(spec, kind="continuous", vocab_size=0)
    try:
        inner = registry.build("metric", config.metric, spec=continuous, data=data)
    except ConfigError as exc:
        raise exc.within("metric") from None
    return Dequantized(inner, spec.extra["bin_low"], spec.extra["bin_high"], bins)
