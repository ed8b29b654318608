"""Flow-matching objectives (``flow_matching``; ``velocity_mse`` is the same objective under its older name).

Draw ``x_0 ~ p_0`` from the path (or take ``batch["x0"]`` when the data gives
couplings, as reflow does), ``t`` from a time sampler, ``x_t`` from the path,
and regress the model on the target of its prediction type:

    velocity:  d alpha_t x_1 + d sigma_t x_0        epsilon:  x_0        x1:  x_1

    L = E_t [ w(t) * mean_over_dims (f_theta(x_t, t, y) - target)^2 ]

Loss weighting ``w(t)`` (``loss_weighting``), written with the path's
``alpha, sigma, d alpha, d sigma`` at ``t``, ``SNR = alpha^2 / sigma^2`` and
``D = sigma d alpha - alpha d sigma``. At fixed ``x_t`` the three errors are
proportional to the x_1 error: ``|err_v| = |D / sigma| |err_x1|``,
``|err_eps| = (alpha / sigma) |err_x1|``. So:

* ``none``: ``w = 1``.
* ``velocity``: ``w`` makes the loss equal to the velocity MSE of the converted
  prediction (``(D/alpha)^2`` for epsilon, ``(D/sigma)^2`` for x1, 1 for
  velocity), capped at ``max_weight``.
* ``min_snr``: Min-SNR-gamma (Hang et al. 2023): the x_1-space weight is
  ``min(SNR, gamma)``, i.e. ``min(1, gamma/SNR)`` for epsilon,
  ``min(SNR, gamma)`` for x1 and ``min(alpha^2, gamma sigma^2) / D^2`` for velocity.

Time samplers (``time_sampler``), all in the t=0-noise convention:

* ``uniform``: ``t ~ U[0, 1]``.
* ``logit_normal``: ``t = sigmoid(mean + std n)``, ``n ~ N(0, 1)`` (SD3 / minRF; positive mean favours data).
* ``log_normal``: EDM's noise levels ``ln sigma ~ N(p_mean, p_std^2)`` mapped to times by the
  scheduler, ``t = snr_inverse(1 / sigma)`` (``p_mean = -1.2, p_std = 1.2`` in EDM).
* ``mode``: SD3's mode sampling ``t = 1 - f(u)``, ``f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)``,
  ``u ~ U[0, 1]``, ``s = mode_scale`` in ``[-1, 2 / (pi - 2)]`` (s = 0 is uniform; s > 0 favours mid times).
* ``grid``: ``t`` uniform on ``{0, 1/k, ..., (k-1)/k}``, ``k = grid_steps``: the times a k-step euler sampler
  evaluates. On a k-RF's own couplings (``reflow_pairs``) this is Liu et al.'s k-step distillation; ``k = 1``
  trains ``u(x_0, 0)`` on ``x_1 - x_0`` only, one-step distillation.

Couplings (``coupling``, couplings.py): drawn noise is re-paired with the data by exact minibatch OT,
Sinkhorn's entropic plan or OT within each label, on blocks of ``coupling_block`` examples. On a
stochastic interpolant path (interpolants.py) the latent ``z`` is drawn per example (stream
``"latent"``) and ``prediction = "velocity_score"`` regresses ``[u_t, z]`` with two heads.

``time_shift = s`` then maps every time through SD3's shift ``t' = t / (t + s (1 - t))``
(`plugins.flow_matching.solver.shift_times`; s > 1 favours the noise, as at high resolution).

On a manifold path (``geodesic``) the model's output is first projected onto the tangent space at
``x_t`` (``path.tangent``), so the loss is the Riemannian squared norm of the velocity error of an
embedded manifold (Chen & Lipman 2023, eq. 9); couplings other than ``independent`` are refused there.

With ``label_dropout = p`` each label is replaced by the null label
``num_classes`` with probability ``p`` (trains the unconditional model of
classifier-free guidance).

Logged: ``loss_bin/k`` for ``k < loss_bins``, the mean per-sample loss of the
log interval's examples with ``t`` in ``[k / K, (k + 1) / K)``: their summed loss over
their count, as minRF accumulates its bins over an epoch. Returned as one
`core.interfaces.Binned` under ``loss_bin`` (the trainer bins it when it logs, element k as
``loss_bin/k``); a bin no example fell in during an interval is left out of that record.

`sampling_model` returns the model itself for velocity prediction, and a
converting wrapper (`transforms.PredictionToVelocity`) otherwise; the wrapper
evaluates an epsilon model at ``t >= sampling_eps`` and an x1 model at
``t <= 1 - sampling_eps``, where the conversion is finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import attrs
import torch
from torch import Tensor, nn

from core import rng
from core.guidance import check_options, configured, drop_labels
from core.interfaces import Batch, Binned, DataSpec, Field, Objective, Path, Scheduler
from registry import ConfigError

from .couplings import coupled_source, coupling_eps
from .interpolants import VelocityScore, velocity_score_loss
from .path import AffinePath
from .solver import shift_times


@attrs.define
class FlowMatchingConfig:
    """Options of the flow_matching (alias velocity_mse) objective.

    Attributes:
        prediction: what the model predicts: "velocity", "epsilon" (the source x_0), "x1" (the data) or
            "velocity_score" (interpolant paths: the velocity and E[z | x_t], twice the channels; interpolants.py).
        loss_weighting: "none", "velocity" (the MSE of the prediction converted to a velocity) or "min_snr".
        min_snr_gamma: gamma of min_snr weighting.
        max_weight: cap on the velocity weighting (it is unbounded at one end of time).
        time_sampler: "uniform", "logit_normal", "log_normal" (EDM), "mode" (SD3) or "grid" (t on {i / grid_steps}).
        grid_steps: k of the "grid" sampler: t uniform on {0, 1/k, ..., (k-1)/k} (k-step distillation).
        mean: mean of the logit-normal sampler.
        std: standard deviation of the logit-normal sampler.
        p_mean: mean of ln(sigma) of the log-normal (EDM) sampler.
        p_std: standard deviation of ln(sigma) of the log-normal (EDM) sampler.
        mode_scale: the scale s of mode sampling, in [-1, 2 / (pi - 2)].
        time_shift: SD3's shift s applied to every sampled time, t' = t / (t + s (1 - t)) (1: none).
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
        loss_bins: number of equal bins of t whose mean loss is logged as loss_bin/k (0: none).
        sampling_eps: how far from the singular end an epsilon or x1 model is evaluated when sampling.
        guidance_interval: [lo, hi]: classifier-free guidance only for t in it (Kynkaanniemi et al.).
        guidance_rescale: CFG rescale phi (Lin et al.) of the model's output, see `core.guidance`.
        coupling: how drawn source noise is paired with the data: "independent", "ot" (exact minibatch
            OT), "sinkhorn" (entropic OT, pairs drawn from the plan) or "class_ot" (OT within each label);
            see couplings.py.
        coupling_block: couple consecutive blocks of this many examples (0: the whole micro-batch). A block
            that divides the micro-batch makes the coupling process-count invariant.
        sinkhorn_eps: entropic regularisation of "sinkhorn" in units of the squared distance (None: 2 sigma^2
            of a schrodinger_bridge / interpolant path, SB-CFM's choice).
    """

    prediction: Literal["velocity", "epsilon", "x1", "velocity_score"] = "velocity"
    loss_weighting: Literal["none", "velocity", "min_snr"] = "none"
    min_snr_gamma: float = 5.0
    max_weight: float = 1e4
    time_sampler: Literal["uniform", "logit_normal", "log_normal", "mode", "grid"] = "uniform"
    grid_steps: int = 1
    mean: float = 0.0
    std: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    mode_scale: float = 1.29
    time_shift: float = 1.0
    label_dropout: float = 0.0
    loss_bins: int = 4
    sampling_eps: float = 1e-3
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    guidance_rescale: float = 0.0
    coupling: Literal["independent", "ot", "sinkhorn", "class_ot"] = "independent"
    coupling_block: int = 0
    sinkhorn_eps: float | None = None

    def __attrs_post_init__(self) -> None:
        check_options(self.guidance_interval, self.guidance_rescale)
        checks = [
            (self.coupling_block >= 0, "coupling_block", "a non-negative integer"),
            (self.grid_steps >= 1, "grid_steps", "a positive integer"),
            (self.sinkhorn_eps is None or self.sinkhorn_eps > 0, "sinkhorn_eps", "a positive number"),
            (self.std > 0, "std", "a positive number"),
            (self.p_std > 0, "p_std", "a positive number"),
            (-1.0 <= self.mode_scale <= 2.0 / (math.pi - 2.0), "mode_scale",
             f"a number in [-1, {2.0 / (math.pi - 2.0):.4f}] (mode sampling is monotone only there)"),
            (0.0 <= self.label_dropout <= 1.0, "label_dropout", "a probability in [0, 1]"),
            (self.loss_bins >= 0, "loss_bins", "a non-negative integer"),
            (0.0 <= self.sampling_eps < 0.5, "sampling_eps", "a number in [0, 0.5)"),
            (self.min_snr_gamma > 0, "min_snr_gamma", "a positive number"),
            (self.max_weight > 0, "max_weight", "a positive number"),
            (self.time_shift > 0, "time_shift", "a positive number"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, key)!r}", (key,))


#: The older name of the same options (``velocity_mse``).
VelocityMSEConfig = FlowMatchingConfig


def sample_times(config: FlowMatchingConfig, n: int, device: torch.device | str | None = None, *,
                 scheduler: Scheduler | None = None, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, draw: rng.ExampleRandom | None = None) -> Tensor:
    """``n`` times ``(n,)`` in [0, 1] from the configured sampler.

    Draws per example from `draw` (a batch's `core.rng.for_batch`, stream ``"time"``) when given,
    else from `generator` (on its device), else from torch's global RNG. ``log_normal`` maps
    noise levels to times with `scheduler` (the cond_ot map ``1 / (1 + sigma)`` without one).
    Every sampler's times then pass through SD3's shift (`shift_times`, ``time_shift``).
    """
    return shift_times(_unshifted_times(config, n, device, scheduler, generator, dtype, draw), config.time_shift)


def _unshifted_times(config: FlowMatchingConfig, n: int, device: torch.device | str | None,
                     scheduler: Scheduler | None, generator: torch.Generator | None, dtype: torch.dtype,
                     draw: rng.ExampleRandom | None) -> Tensor:
    """`sample_times` before SD3's shift."""
    kind = config.time_sampler
    gdev = generator.device if generator is not None else device
    if draw is None:
        draw = rng.GlobalRandom(n, generator)
    else:
        gdev = device

    def rand() -> Tensor:
        return draw.rand((), "time", device=gdev, dtype=dtype).to(device)

    def randn() -> Tensor:
        return draw.randn((), "time", device=gdev, dtype=dtype).to(device)

    if kind == "uniform":
        return rand()
    if kind == "logit_normal":
        return torch.sigmoid(affine(randn(), config.mean, config.std))
    if kind == "log_normal":
        snr = torch.exp(-affine(randn(), config.p_mean, config.p_std))
        t = scheduler.snr_inverse(snr) if scheduler is not None else snr / (1.0 + snr)
        return t.clamp(0.0, 1.0)
    if kind == "mode":
        u = rand()
        s = config.mode_scale
        noise_level = 1.0 - u - s * (torch.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)
        return (1.0 - noise_level).clamp(0.0, 1.0)
    if kind == "grid":
        return torch.floor(rand() * config.grid_steps) / config.grid_steps
    raise ValueError(f"unknown time sampler {kind!r}")


def affine(n: Tensor, mean: float, std: float) -> Tensor:
    """``mean + std * n``, skipping the ops that would not change a bit (``std = 1``, ``mean = 0``)."""
    if std != 1.0:
        n = std * n
    return n + mean if mean != 0.0 else n


def loss_weights(kind: str, prediction: str, path: AffinePath, t: Tensor, *, gamma: float = 5.0,
                 max_weight: float = 1e4) -> Tensor:
    """Per-sample weights ``w(t)`` ``(B,)`` of the module docstring (float32 or t's dtype)."""
    if kind == "none":
        return torch.ones_like(t)
    s = path.scheduler(t)
    a, b, da, db = s.alpha_t, s.sigma_t, s.d_alpha_t, s.d_sigma_t
    d2 = (b * da - a * db) ** 2
    if kind == "velocity":
        if prediction == "velocity":
            return torch.ones_like(t)
        w = d2 / (a * a) if prediction == "epsilon" else d2 / (b * b)
        return w.clamp(max=max_weight)
    if kind == "min_snr":
        if prediction == "epsilon":
            return torch.clamp(gamma * b * b / (a * a), max=1.0)
        if prediction == "x1":
            return torch.clamp((a * a) / (b * b), max=gamma)
        return torch.minimum(a * a, gamma * b * b) / d2
    raise ValueError(f"unknown loss weighting {kind!r}")


class FlowMatching(Objective):
    """See the module docstring."""

    def __init__(self, config: FlowMatchingConfig, spec: DataSpec, path: Path | None = None):
        if path is None:
            raise ConfigError("this objective needs a [path] section (e.g. plugin = \"affine\")")
        affine = isinstance(path, AffinePath)
        latent = getattr(path, "latent_noise", False)
        if config.prediction == "velocity_score" and not latent:
            raise ConfigError("prediction \"velocity_score\" needs a stochastic interpolant path (plugin = "
                              "\"interpolant\" or \"schrodinger_bridge\")", ("prediction",))
        if not affine and config.prediction not in ("velocity", "velocity_score"):
            raise ConfigError(f"prediction {config.prediction!r} needs an affine path (it converts through "
                              f"alpha_t and sigma_t); this experiment's path is {type(path).__name__}", ("prediction",))
        if not affine and config.loss_weighting != "none":
            raise ConfigError("loss weighting needs an affine path", ("loss_weighting",))
        if getattr(path, "manifold", None) is not None and config.coupling != "independent":
            raise ConfigError(f"coupling {config.coupling!r} pairs by Euclidean distances; on the {path.manifold.name} "
                              f"path use coupling = \"independent\"", ("coupling",))
        self.config, self.spec, self.path = config, spec, path
        self.coupling_eps = coupling_eps(config, spec, path)

    @property
    def scheduler(self) -> Scheduler | None:
        return getattr(self.path, "scheduler", None)

    def loss(self, models: Mapping[str, nn.Module], batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        x_1 = batch["x"]
        draw = rng.for_batch(batch)
        x_0 = coupled_source(c, self.coupling_eps, batch, draw, self.path)
        t_dtype = torch.float64 if x_1.dtype == torch.float64 else torch.float32
        t = sample_times(c, x_1.shape[0], x_1.device, scheduler=self.scheduler, dtype=t_dtype, draw=draw)
        if getattr(self.path, "latent_noise", False):
            ps = self.path.sample(x_0, x_1, t, z=draw.randn_like(x_1, "latent"))
        else:
            ps = self.path.sample(x_0, x_1, t)
        y = batch.get("y")
        if y is not None:
            y = drop_labels(y, c.label_dropout, self.spec.num_classes, draw)
        pred = models["model"](ps.x_t, t, y)
        if hasattr(self.path, "tangent"):  # a manifold path: only the output's tangent part is a velocity
            pred = self.path.tangent(ps.x_t, pred)
        if c.prediction == "velocity_score":
            per_sample = velocity_score_loss(pred, ps)
        else:
            target = ps.target if c.prediction == "velocity" else self.path.target(ps, c.prediction)
            dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)  # >= float32
            if pred.dtype != dtype or target.dtype != dtype:
                pred, target = pred.to(dtype), target.to(dtype)
            squared = (pred - target).pow(2)
            if c.loss_weighting == "none":  # the mean of the per-example means, as one op and one autograd node
                if not c.loss_bins:
                    return squared.mean(), {}
                return squared.mean(), self._bin_logs(squared.detach().reshape(x_1.shape[0], -1).mean(1), t.detach())
            per_sample = squared.reshape(x_1.shape[0], -1).mean(1)
        if c.loss_weighting != "none":
            per_sample = per_sample * loss_weights(c.loss_weighting, c.prediction, self.path, t.to(dtype),
                                                   gamma=c.min_snr_gamma, max_weight=c.max_weight).detach()
        loss = per_sample.mean()
        return loss, self._bin_logs(per_sample.detach(), t.detach())

    def _bin_logs(self, per_sample: Tensor, t: Tensor) -> dict[str, Binned]:
        """``{"loss_bin": Binned(per_sample (B,), t (B,), K)}``: the trainer logs ``loss_bin/i``, the mean loss of
        the log interval's examples with ``t`` in ``[i/K, (i+1)/K)``; nothing is computed per step."""
        k = self.config.loss_bins
        return {"loss_bin": Binned(per_sample, t, k)} if k else {}

    @property
    def prediction(self) -> str:
        """What the model predicts: ``[objective] prediction`` (velocity, epsilon or x1)."""
        return self.config.prediction

    def sampling_model(self, model: nn.Module) -> Field:
        model = configured(model, self.config.guidance_interval, self.config.guidance_rescale)
        if self.config.prediction == "velocity":
            return model
        if self.config.prediction == "velocity_score":
            return VelocityScore(model, self.path)
        from .transforms import PredictionToVelocity

        return PredictionToVelocity(model, self.path, self.config.prediction, self.config.sampling_eps)


def make_flow_matching(config: FlowMatchingConfig, spec: DataSpec, path: Path | None = None) -> FlowMatching:
    """Objective factory for ``plugin = "flow_matching"``."""
    return FlowMatching(config, spec, path)


def make_velocity_mse(config: VelocityMSEConfig, spec: DataSpec, path: Path | None = None) -> FlowMatching:
    """Objective factory for ``plugin = "velocity_mse"`` (the flow_matching objective under its older name)."""
    return FlowMatching(config, spec, path)
