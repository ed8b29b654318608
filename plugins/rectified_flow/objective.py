"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): one-step generation from scratch.

**Time convention.** flowforge runs from noise at ``t = 0`` to data at ``t = 1`` (DESIGN.md); the paper runs
the other way (data at 0, noise at 1, its ``z_t = (1 - t) x + t eps``, velocity ``eps - x``). With
``t_paper = 1 - t`` and the velocity's sign flipped, the paper's ``u(z_t, r, t)`` (state at the noisier
``t``, ``r <= t``) becomes, here, the **average velocity from t forward to r >= t**

    u(z_t, t, r) = 1 / (r - t) * int_t^r v(z_s, s) ds,      z_r = z_t + (r - t) u(z_t, t, r),

with ``u(z, t, t) = v(z, t)``, the instantaneous (marginal) velocity. Differentiating
``(r - t) u = int_t^r v ds`` in ``t`` along the flow (``dz_t / dt = v``) gives the MeanFlow identity
(the paper's Eq. 6 in this convention; its ``- (t - r) d/dt_paper`` becomes ``+ (r - t) d/dt``):

    u(z_t, t, r) = v(z_t, t) + (r - t) * d/dt u(z_t, t, r),
    d/dt u = v . grad_z u + partial_t u         (a JVP with tangent (v, 1, 0) on (z, t, r)).

**Training** (`meanflow_target`, the objective ``meanflow``): draw ``x_0 ~ p_0`` (or ``batch["x0"]``), two
times, ``t = min``, ``r = max``, then ``r = t`` for a fraction ``1 - ratio`` of the batch (paper: 25% of
the examples have ``r != t``), ``z_t`` and the conditional velocity ``v`` (``x_1 - x_0`` on the cond_ot
path) from the experiment's path, and regress ``u_theta(z_t, t, r)`` on the stop-gradient target

    u_tgt = v + (r - t) * sg( d/dt u_theta(z_t, t, r) ),

computed with ``torch.func.jvp`` (the primal output is the prediction). The target is affine in ``v``, so with
the conditional ``v`` it equals the marginal target in expectation given ``z_t``. The loss is the paper's
adaptive weighting ``L = sg(w) ||Delta||^2``, ``Delta = u_theta - u_tgt`` (squared norm summed over the data
dimensions), ``w = 1 / (||Delta||^2 + c)^p`` (``p = 0``: plain squared error; paper: ``p = 1``, ``c = 1e-3``).
Time samplers: ``uniform`` or ``logit_normal`` (``sigmoid(mean + std n)``; the paper's
``lognorm(-0.4, 1.0)`` in its convention is ``mean = 0.4`` here). Logged: ``mse`` (the unweighted mean
squared error per element; the weighted loss itself is near 1 for ``p = 1``) and ``interval_fraction``.
Not implemented: the paper's guided target for classifier-free guidance (labels are passed to the network,
with optional ``label_dropout``).

**Sampling** (the solver ``meanflow``, solver.py): on the grid ``t_i = i / k``,
``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i, t_{i+1})``; ``k = 1`` is one-step generation
``x_1 = x_0 + u(x_0, 0, 1)`` (1 model evaluation). The backbone must take the interval's end ``r``
(``model(x, t, y, r=r)``, e.g. ``[backbone] plugin = "mlp"`` with ``interval_input = true``); called
without ``r`` it is the instantaneous velocity, so the ``ode`` solvers sample it as an ordinary flow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from core import rng
from core.guidance import drop_labels
from core.interfaces import Batch, DataSpec, Field, Objective, Path
from core.nn import append_dims
from registry import ConfigError

#: ``u(z, t, r) -> (B, ...)``: an average-velocity network with the label bound.
AverageVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]


@attrs.define
class MeanFlowConfig:
    """Options of the meanflow objective.

    Attributes:
        ratio: fraction of the examples trained on an interval (r != t); the others have r = t (flow matching).
        time_sampler: "uniform" or "logit_normal" distribution of each of the two times (t = noise, 1 = data).
        mean: mean of the logit-normal sampler (flowforge's convention: positive favours the data end).
        std: standard deviation of the logit-normal sampler.
        weight_power: p of the adaptive weight 1 / (||Delta||^2 + c)^p (0: plain squared error).
        weight_eps: c of the adaptive weight.
        label_dropout: probability of replacing a label by the null label.
    """

    ratio: float = 0.25
    time_sampler: Literal["uniform", "logit_normal"] = "logit_normal"
    mean: float = 0.4
    std: float = 1.0
    weight_power: float = 1.0
    weight_eps: float = 1e-3
    label_dropout: float = 0.0

    def __attrs_post_init__(self) -> None:
        checks = [(0.0 <= self.ratio <= 1.0, "ratio", "a fraction in [0, 1]"),
                  (self.std > 0, "std", "a positive number"),
                  (self.weight_power >= 0, "weight_power", "a non-negative number"),
                  (self.weight_eps > 0, "weight_eps", "a positive number"),
                  (0.0 <= self.label_dropout <= 1.0, "label_dropout", "a probability in [0, 1]")]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, key)!r}", (key,))


def meanflow_target(u: AverageVelocity, z: Tensor, t: Tensor, r: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The prediction ``u(z, t, r)`` and the MeanFlow target ``v + (r - t) d/dt u(z, t, r)`` (not detached).

    ``z, v (B, ...)``, ``t, r (B,)``; ``d/dt u`` is the JVP of ``u`` along ``(v, 1, 0)`` on ``(z, t, r)``
    (`torch.func.jvp`: one forward pass gives both). Returns ``(prediction, target)``, both ``(B, ...)``.
    """
    pred, du_dt = torch.func.jvp(u, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return pred, v + append_dims(r - t, v.ndim) * du_dt


def adaptive_loss(delta: Tensor, power: float, eps: float) -> Tensor:
    """``mean_b sg(w_b) ||delta_b||^2`` with ``w_b = 1 / (||delta_b||^2 + eps)^power``; ``delta (B, ...)``."""
    sq = delta.pow(2).reshape(delta.shape[0], -1).sum(1)
    weight = (sq.detach() + eps).pow(-power) if power > 0 else torch.ones_like(sq)
    return (weight * sq).mean()


class MeanFlow(Objective):
    """See the module docstring."""

    prediction = "average_velocity"

    def __init__(self, config: MeanFlowConfig, spec: DataSpec, path: Path | None = None):
        if path is None:
            raise ConfigError("this objective needs a [path] section (e.g. plugin = \"affine\")")
        if spec.kind != "continuous":
            raise ConfigError("MeanFlow needs continuous data (it differentiates the network in z)")
        self.config, self.spec, self.path = config, spec, path

    def times(self, n: int, draw: rng.ExampleRandom, device: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(t, r)``, each ``(n,)``: two sampled times sorted, ``r = t`` except on a fraction ``ratio``."""
        c = self.config
        if c.time_sampler == "uniform":
            a, b = (draw.rand((), s, device=device, dtype=dtype) for s in ("time", "time_end"))
        else:
            a, b = (torch.sigmoid(c.mean + c.std * draw.randn((), s, device=device, dtype=dtype))
                    for s in ("time", "time_end"))
        t, r = torch.minimum(a, b), torch.maximum(a, b)
        interval = draw.rand((), "interval", device=device, dtype=dtype) < c.ratio
        return t, torch.where(interval, r, t)

    def loss(self, models: Mapping[str, nn.Module], batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        c, x_1 = self.config, batch["x"]
        draw = rng.for_batch(batch)
        x_0 = batch["x0"] if "x0" in batch else self.path.sample_source(x_1.shape, device=x_1.device,
                                                                         dtype=x_1.dtype, draw=draw)
        t, r = self.times(x_1.shape[0], draw, x_1.device, x_1.dtype)
        ps = self.path.sample(x_0, x_1, t)
        y = batch.get("y")
        if y is not None:
            y = drop_labels(y, c.label_dropout, self.spec.num_classes, draw)
        model = models["model"]
        pred, target = meanflow_target(lambda z, t_, r_: model(z, t_, y, r=r_), ps.x_t, t, r, ps.target)
        loss = adaptive_loss(pred - target.detach(), c.weight_power, c.weight_eps)
        mse = (pred.detach() - target.detach()).pow(2).mean()
        return loss, {"mse": mse, "interval_fraction": (r > t).float().mean()}

    def sampling_model(self, model: nn.Module) -> Field:
        """The network itself: ``model(x, t, y)`` is the instantaneous velocity, ``model(x, t, y, r=r)`` the average."""
        return model


def make_meanflow(config: MeanFlowConfig, spec: DataSpec, path: Path | None = None) -> MeanFlow:
    """Objective factory for ``plugin = "meanflow"``."""
    return MeanFlow(config, spec, path)
