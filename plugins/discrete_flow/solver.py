"""The discrete Euler solver: simulates the CTMC of a mixture path from t=0 to t=1.

On a time grid ``t_0 < t_1 < ... < t_N`` (uniform ``t_k = k / steps`` by default, or any
increasing list ``times`` in [0, 1], as Meta's solver takes any ``time_grid``), with
``h = t_{k+1} - t_k`` and the
model's posterior ``p_{1|t}(. | x_t)`` (from its logits, through the path),
each position ``i`` of ``x_t`` takes one step of the probability velocity

    u = u_t(., x_t) + beta_t * v_t(., x_t)

(``u_t`` the marginal velocity, ``v_t`` the divergence-free field of
`plugins.discrete_flow.path`): with total jump rate ``lambda^i = sum_{x != x_t^i} u(x)``
the position jumps with probability ``1 - exp(-h lambda^i)``, to ``x`` with
probability ``u(x) / lambda^i``, and stays otherwise. The last step draws
``x_1 ~ p_{1|t}(. | x_t)`` directly when the grid ends at ``t = 1`` (the velocity's rate
``1 / (1 - kappa)`` diverges there); a grid ending earlier takes a jump step there too and
returns ``x_{t_N}``. Both the velocity and ``beta`` of step ``k`` are evaluated at ``t_k``.
Model evaluations: ``N`` (``steps``, or ``len(times) - 1``).

``div_free`` sets ``beta_t``: a constant (``div_free = 0.5``) or ``"sym"``,
``beta_t = sym_scale * t^sym_t_power * (1 - t)^sym_one_minus_t_power`` — the
defaults ``12 t^2 (1 - t)^0.25`` are the ``sym_func`` of flow_matching's
discrete CIFAR-10 run (FID 3.58, mask source, 1024 steps, float64 sampling).
The divergence-free term needs the source distribution, which the path
provides: uniform, or the one-hot of the mask (then the term re-masks tokens
and lets them be predicted again, a corrector).

Guidance (core/guidance.py) acts on the model's output, here the logits:
``(1 + w) logits(y) - w logits(null)`` is the posterior
``p(.|y)^(1+w) / p(.|null)^w`` renormalised.

Infilling: ``known`` (BoolTensor shaped like ``x_init``) marks positions whose
value in ``x_init`` is given; they are held at it through every step,
including the last, and the model sees them at every time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import attrs
import torch
from torch import Tensor
from torch.nn import functional as F

from core.interfaces import Field, Path, Solver, SolverResult
from registry import ConfigError

from .path import DiscretePath, categorical, uniform

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@attrs.define
class DiscreteEulerConfig:
    """Options of the discrete_euler solver.

    Attributes:
        steps: number of uniform steps from t=0 to t=1 (= model evaluations).
        times: an explicit strictly increasing time grid in [0, 1] (overrides steps); the
            solver starts at times[0] and ends at times[-1].
        div_free: coefficient beta_t of the divergence-free term: a number, or "sym"
            for sym_scale * t^sym_t_power * (1 - t)^sym_one_minus_t_power.
        sym_scale: scale of the "sym" coefficient.
        sym_t_power: power of t in the "sym" coefficient.
        sym_one_minus_t_power: power of (1 - t) in the "sym" coefficient.
        categorical_dtype: precision of categorical sampling, "float32" or "float64".
    """

    steps: int = 100
    times: list[float] | None = None
    div_free: float | str = 0.0
    sym_scale: float = 12.0
    sym_t_power: float = 2.0
    sym_one_minus_t_power: float = 0.25
    categorical_dtype: Literal["float32", "float64"] = "float32"

    def __attrs_post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"expected a positive integer, got {self.steps!r}", ("steps",))
        if self.times is not None:
            ts = [float(v) for v in self.times]
            if len(ts) < 2 or any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] < 0 or ts[-1] > 1:
                raise ConfigError(f"expected at least two strictly increasing times in [0, 1], got {self.times!r}",
                                  ("times",))
        if isinstance(self.div_free, str) and self.div_free != "sym":
            raise ConfigError(f"expected a non-negative number or \"sym\", got {self.div_free!r}", ("div_free",))
        if not isinstance(self.div_free, str) and self.div_free < 0:
            raise ConfigError(f"expected a non-negative number or \"sym\", got {self.div_free!r}", ("div_free",))

    def beta(self) -> Callable[[float], float]:
        """``t -> beta_t``, the divergence-free coefficient."""
        if self.div_free == "sym":
            a, p, q = self.sym_scale, self.sym_t_power, self.sym_one_minus_t_power
            return lambda t: a * t**p * (1.0 - t) ** q
        c = float(self.div_free)
        return lambda t: c


class DiscreteEulerSolver(Solver):
    """See the module docstring.

    Args:
        config: the solver options.
        path: the mixture path the model was trained on (posteriors, velocities, source).
    """

    def __init__(self, config: DiscreteEulerConfig, path: DiscretePath):
        self.config, self.path = config, path
        self.beta = config.beta()

    def time_grid(self) -> Tensor:
        """``(N + 1,)`` float64 times: ``times``, or ``steps + 1`` uniform ones from 0 to 1."""
        if self.config.times is not None:
            return torch.tensor(self.config.times, dtype=torch.float64)
        return torch.linspace(0.0, 1.0, self.config.steps + 1, dtype=torch.float64)

    def jump_rates(self, posterior: Tensor, x_t: Tensor, t: Tensor, beta: float = 0.0) -> Tensor:
        """Off-diagonal rates ``u(x)`` for ``x != x_t`` (zero at ``x_t``), ``(B, ..., V)``."""
        u = self.path.velocity(posterior, x_t, t)
        if beta > 0:
            u = u + beta * self.path.divergence_free(posterior, x_t, t)
        return u.masked_fill(F.one_hot(x_t, u.shape[-1]).bool(), 0.0).clamp_min(0.0)

    @torch.no_grad()
    def sample(self, model: Field, x_init: Tensor, *, y: Tensor | None = None,
               generator: torch.Generator | None = None, intermediates: bool = False,
               known: Tensor | None = None) -> SolverResult:
        """Transport ``x_init (B, ...)`` (source tokens; given tokens where ``known``) to t=1.

        Args:
            model: ``model(x, t, y) -> logits (B, ..., V)`` with ``t (B,)``.
            x_init: LongTensor ``(B, ...)``.
            y: class labels ``(B,)`` passed to the model, or None.
            generator: all random draws (jumps, categorical samples) use it.
            intermediates: also return the states after every step.
            known: BoolTensor ``(B, ...)``: positions held at their value in ``x_init``.
        """
        cdtype = _DTYPES[self.config.categorical_dtype]
        grid = self.time_grid()
        steps, batch = grid.shape[0] - 1, x_init.shape[0]
        x = x_init.clone()
        traj = [x] if intermediates else None
        for k in range(steps):
            t = grid[k].to(x.device).expand(batch)
            posterior = self.path.posterior(model(x, t.float(), y), x, t)
            if k == steps - 1 and float(grid[-1]) == 1.0:
                x_next = categorical(posterior, generator, cdtype)
            else:
                h = float(grid[k + 1] - grid[k])
                rates = self.jump_rates(posterior.to(cdtype), x, t, self.beta(float(grid[k])))
                total = rates.sum(-1)
                jump = uniform(x.shape, generator, x.device).to(cdtype) < -torch.expm1(-h * total)
                x_next = torch.where(jump, categorical(rates, generator, cdtype), x)
            x = torch.where(known, x_init, x_next) if known is not None else x_next
            if traj is not None:
                traj.append(x)
        return SolverResult(x=x, nfe=steps, trajectory=torch.stack(traj) if traj is not None else None,
                            times=grid.float() if intermediates else None)


def make_discrete_euler(config: DiscreteEulerConfig, path: Path | None = None) -> DiscreteEulerSolver:
    """Solver factory: needs the experiment's mixture_discrete ``[path]``."""
    if not isinstance(path, DiscretePath):
        raise ConfigError("discrete_euler needs a discrete [path] section: plugin = \"mixture_discrete\" or "
                          "\"metric_discrete\"", ("plugin",))
    if config.div_free != 0 and not path.has_divergence_free:
        raise ConfigError(f"the {type(path).__name__} has no divergence-free field: set div_free = 0",
                          ("div_free",))
    return DiscreteEulerSolver(config, path)

