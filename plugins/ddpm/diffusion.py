"""Discrete-time Gaussian diffusion: the numbers of guided-diffusion / improved-diffusion.

This module is the math shared by the ``gaussian_diffusion`` path, the ``ddpm``
objective, the ``ddpm_ancestral`` and ``ddim`` solvers and the ``ddpm_bpd``
metric. It follows openai/guided-diffusion's ``gaussian_diffusion.py``,
``respace.py`` and ``losses.py`` (same schedules, coefficients, clipping and
loss scalings); the names of the coefficient tables are theirs.

Notation (DDPM's, not flowforge's): ``x_start`` is the data, ``noise`` (eps) a
standard Gaussian draw, and step ``k = 0 .. T-1`` indexes

    q(x_k | x_start) = N(sqrt(abar_k) x_start, (1 - abar_k) I),   abar_k = prod_{j <= k} (1 - beta_j),

so ``x_0`` is the data after one noising step and ``x_{T-1}`` is (nearly) pure
noise. (In flowforge's own notation ``x_0`` is the noise and ``x_1`` the data;
this module says ``x_start`` and ``noise`` to avoid the clash.)

**Time mapping.** The state ``x_k`` lives at flowforge time

    t_k = 1 - (k + 1) / T        (`step_to_time`; inverse `time_to_step`)

so the pure-noise start of sampling, ``x_{T-1}``, is ``t = 0`` (the source),
the least noisy state ``x_0`` is ``t = 1 - 1/T``, and the data itself (after the
last sampling step) is ``t = 1``. This is exactly the continuous-time view of
the cosine schedule, ``abar_k = abar((k + 1) / T)``, read backwards. Models are
called as ``model(x_k, t_k, y)``; backbones scale ``t`` by 1000 in their time
embedding. After respacing, a kept step keeps its original time (the model sees
the times it was trained on), as guided-diffusion's ``_WrappedModel`` does.

Model outputs (``prediction``): ``epsilon``, ``x_start`` or ``v`` with
``v = sqrt(abar) eps - sqrt(1 - abar) x_start``. Variances (``variance``):
``fixed_small`` (the posterior variance, log clipped at step 0), ``fixed_large``
(``beta_k``, with step 0 set to the posterior variance of step 1),
``learned`` (the model's extra channels are the log-variance) and
``learned_range`` (the extra channels ``v`` in [-1, 1] interpolate
``log var = (v+1)/2 log beta_k + (1-(v+1)/2) log posterior_variance_k``);
learned variances need a backbone with twice the data's channels.

All tables are float64 tensors; each coefficient is gathered per batch element
and cast to the data's dtype (float32 data computes in float32 as
guided-diffusion does, float64 data stays exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import torch
from torch import Tensor

PREDICTIONS = ("epsilon", "x_start", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
SCHEDULES = ("linear", "cosine")
#: variance type -> (variance table, log-variance table)
_FIXED_VARIANCE = {"fixed_small": ("posterior_variance", "posterior_log_variance_clipped"),
                   "fixed_large": ("fixed_large_variance", "fixed_large_log_variance")}


# --------------------------------------------------------------------------- schedules
def linear_betas(steps: int) -> Tensor:
    """Ho et al.'s linear schedule 1e-4 .. 0.02, scaled by ``1000 / steps``, float64.

    Raises:
        ValueError: for ``steps <= 20``, where the last beta ``20 / steps`` would reach 1.
    """
    if steps <= 20:
        raise ValueError(f"the linear schedule's last beta 0.02 * 1000 / steps is {20 / steps:.3g} for {steps} steps; "
                         f"it must be below 1: use more than 20 steps or the cosine schedule")
    scale = 1000.0 / steps
    return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)


def betas_for_alpha_bar(steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> Tensor:
    """``beta_k = min(1 - abar((k+1)/T) / abar(k/T), max_beta)`` for a cumulative ``abar`` on [0, 1]."""
    return torch.tensor([min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float64)


def cosine_betas(steps: int) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: ``abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)``, betas clipped at 0.999."""
    return betas_for_alpha_bar(steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)


def named_betas(schedule: str, steps: int) -> Tensor:
    """The betas of a named schedule (``linear`` or ``cosine``), float64 ``(steps,)``."""
    if schedule == "linear":
        return linear_betas(steps)
    if schedule == "cosine":
        return cosine_betas(steps)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


# --------------------------------------------------------------------------- time mapping
def step_to_time(k: Tensor, steps: int) -> Tensor:
    """flowforge time ``t = 1 - (k + 1) / T`` of DDPM step ``k`` (float64 for integer input)."""
    k = torch.as_tensor(k)
    return 1.0 - (k.to(torch.float64) + 1.0) / steps


def time_to_step(t: Tensor, steps: int) -> Tensor:
    """The step whose time is nearest to ``t``: ``round((1 - t) T) - 1`` clamped to ``[0, T-1]`` (LongTensor)."""
    t = torch.as_tensor(t)
    return (torch.round((1.0 - t.to(torch.float64)) * steps) - 1).clamp(0, steps - 1).long()


# --------------------------------------------------------------------------- respacing
def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """The original steps kept by a respacing (guided-diffusion's ``space_timesteps``), sorted.

    ``section_counts``:

    * ``""``: every step;
    * ``"ddimN"``: the smallest integer stride ``s`` with ``len(range(0, T, s)) == N`` (steps
      ``0, s, 2s, ...``); an error when no stride gives exactly ``N`` steps;
    * ``"a,b,c"`` (or one count ``"a"``): the T steps are cut into as many equal sections
      (the first ``T mod n`` one longer) and section ``i`` keeps ``count_i`` steps evenly
      spaced over it (rounded), first and last included.

    Raises:
        ValueError: with a message saying what cannot be done.
    """
    spec = section_counts.strip()
    if not spec:
        return list(range(num_timesteps))
    if spec.startswith("ddim"):
        try:
            desired = int(spec[len("ddim"):])
        except ValueError:
            raise ValueError(f"respacing {section_counts!r}: expected 'ddim' followed by a step count, e.g. 'ddim50'") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        possible = sorted({len(range(0, num_timesteps, stride)) for stride in range(1, num_timesteps)})
        nearest = sorted(possible, key=lambda n: (abs(n - desired), n))[:2]
        hint = (f"; the nearest possible are {' and '.join(f'ddim{n}' for n in sorted(nearest))}" if nearest else "")
        raise ValueError(f"respacing {section_counts!r}: no integer stride s gives exactly {desired} steps "
                         f"0, s, 2s, ... out of {num_timesteps}{hint}, or use '{desired}' to space {desired} "
                         f"steps evenly (respace.py's section counts)")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"respacing {section_counts!r}: expected '', 'ddimN' or comma-separated integers "
                         f"such as '10,15,20'") from None
    if not counts or len(counts) > num_timesteps or any(c < 0 for c in counts):
        raise ValueError(f"respacing {section_counts!r}: expected 1 to {num_timesteps} non-negative section counts")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {section_counts!r}: cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    kept = sorted(set(steps))
    if not kept:
        raise ValueError(f"respacing {section_counts!r} keeps no step")
    return kept


# --------------------------------------------------------------------------- losses
def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor | float, logvar2: Tensor | float) -> Tensor:
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` elementwise, in nats."""
    mean2, logvar2 = torch.as_tensor(mean2).to(mean1), torch.as_tensor(logvar2).to(mean1)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by guided-diffusion (and PixelCNN++)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor, bins: int = 256) -> Tensor:
    """Log-likelihood (nats, elementwise) of data ``x`` in [-1, 1] quantised to `bins` levels under a Gaussian.

    Each value owns the interval of half-width ``1 / (bins - 1)`` around it; the two edge bins
    (``x < -0.999`` and ``x > 0.999``, guided-diffusion's thresholds) extend to -inf and +inf.
    """
    half = 1.0 / (bins - 1)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - half))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# --------------------------------------------------------------------------- the process
@attrs.frozen
class PMeanVariance:
    """``p(x_{k-1} | x_k)`` from one model output; every field shaped like ``x`` ``(B, ...)``."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_xstart: Tensor


class GaussianDiffusion:
    """The forward process, its posteriors and the model's reverse process over a beta schedule.

    Args:
        betas: ``(T,)`` betas in (0, 1].
        prediction: what the model's (first ``C``) output channels predict: epsilon, x_start or v.
        variance: fixed_small, fixed_large, learned or learned_range.
        timestep_map: for a respaced process, the original step of each of its ``T`` steps.
        original_steps: the number of steps of the process it was respaced from.
    """

    def __init__(self, betas: Tensor, prediction: str = "epsilon", variance: str = "fixed_large",
                 timestep_map: Sequence[int] | None = None, original_steps: int | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; expected one of {', '.join(VARIANCES)}")
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values in (0, 1]")
        self.prediction, self.variance = prediction, variance
        self.num_timesteps = T = betas.numel()
        self.original_steps = original_steps or T
        self.timestep_map = torch.as_tensor(list(timestep_map) if timestep_map is not None else range(T), dtype=torch.long)
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map has {self.timestep_map.numel()} entries for {T} steps")

        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        pv = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at step 0: clip its log with step 1's (beta_0 when T == 1).
        first = pv[1:2] if T > 1 else betas[:1]
        fixed_large = torch.cat([first, betas[1:]])
        self.tables: dict[str, Tensor] = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "one_minus_alphas_cumprod": 1.0 - ac,
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": pv,
            "posterior_log_variance_clipped": torch.log(torch.cat([first, pv[1:]])),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            "fixed_large_variance": fixed_large,
            "fixed_large_log_variance": torch.log(fixed_large),
            "model_time": step_to_time(self.timestep_map, self.original_steps),
        }
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    # -- construction ------------------------------------------------------------
    @classmethod
    def named(cls, schedule: str, steps: int, prediction: str = "epsilon", variance: str = "fixed_large") -> GaussianDiffusion:
        """The process of a named schedule (``linear`` or ``cosine``) with `steps` steps."""
        return cls(named_betas(schedule, steps), prediction, variance)

    def respaced(self, section_counts: str) -> GaussianDiffusion:
        """The process over the kept steps of `space_timesteps`, betas recomputed from the kept ``abar``.

        ``beta'_j = 1 - abar_{k_j} / abar_{k_{j-1}}`` so the respaced ``abar'_j == abar_{k_j}``.
        """
        kept = space_timesteps(self.num_timesteps, section_counts)
        if kept == list(range(self.num_timesteps)):
            return self
        ac = self.tables["alphas_cumprod"]
        last, new_betas = torch.ones((), dtype=torch.float64), []
        for k in kept:
            new_betas.append(1.0 - ac[k] / last)
            last = ac[k]
        return GaussianDiffusion(torch.stack(new_betas), self.prediction, self.variance,
                                 timestep_map=self.timestep_map[kept].tolist(), original_steps=self.original_steps)

    @property
    def learned_variance(self) -> bool:
        return self.variance in ("learned", "learned_range")

    # -- table access ------------------------------------------------------------
    def table(self, name: str, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        """A coefficient table ``(T,)`` on `device` in `dtype` (cached)."""
        device = torch.device(device)
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = self.tables[name].to(dtype).to(device)
        return self._cache[key]

    def extract(self, name: str, k: Tensor, like: Tensor) -> Tensor:
        """Table `name` at steps ``k (B,)``, shaped ``(B, 1, ..., 1)`` for broadcasting against `like`."""
        v = self.table(name, like.device, like.dtype)[k.to(like.device)]
        return v.reshape(v.shape + (1,) * (like.ndim - 1))

    def model_time(self, k: Tensor, like: Tensor) -> Tensor:
        """The flowforge time ``(B,)`` the model sees at steps ``k (B,)`` (the original step's time).

        float64 for float64 data, else float32 (half precision would merge neighbouring steps' times).
        """
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return self.table("model_time", like.device, dtype)[k.to(like.device)]

    def steps(self, k: int, batch: int, device: torch.device | str) -> Tensor:
        """Step `k` for every item of a batch: ``(B,)`` LongTensor."""
        return torch.full((batch,), k, dtype=torch.long, device=device)

    # -- the forward process -------------------------------------------------------
    def q_mean_variance(self, x_start: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q(x_k | x_start)``: (mean, variance, log-variance), each shaped like `x_start`."""
        mean = self.extract("sqrt_alphas_cumprod", k, x_start) * x_start
        var = self.extract("one_minus_alphas_cumprod", k, x_start).expand_as(x_start)
        log_var = self.extract("log_one_minus_alphas_cumprod", k, x_start).expand_as(x_start)
        return mean, var, log_var

    def q_sample(self, x_start: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        """``x_k = sqrt(abar_k) x_start + sqrt(1 - abar_k) noise``."""
        return (self.extract("sqrt_alphas_cumprod", k, x_start) * x_start
                + self.extract("sqrt_one_minus_alphas_cumprod", k, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q(x_{k-1} | x_k, x_start)``: (mean, variance, clipped log-variance), each shaped like `x_t`."""
        mean = (self.extract("posterior_mean_coef1", k, x_t) * x_start
                + self.extract("posterior_mean_coef2", k, x_t) * x_t)
        var = self.extract("posterior_variance", k, x_t).expand_as(x_t)
        log_var = self.extract("posterior_log_variance_clipped", k, x_t).expand_as(x_t)
        return mean, var, log_var

    # -- conversions between predictions -------------------------------------------
    def xstart_from_eps(self, x_t: Tensor, k: Tensor, eps: Tensor) -> Tensor:
        return self.extract("sqrt_recip_alphas_cumprod", k, x_t) * x_t - self.extract("sqrt_recipm1_alphas_cumprod", k, x_t) * eps

    def eps_from_xstart(self, x_t: Tensor, k: Tensor, x_start: Tensor) -> Tensor:
        """``(x_t / sqrt(abar) - x_start) / sqrt(1/abar - 1)``; at a zero-SNR step (``abar = 0``) ``x_t`` is the noise."""
        eps = ((self.extract("sqrt_recip_alphas_cumprod", k, x_t) * x_t - x_start)
               / self.extract("sqrt_recipm1_alphas_cumprod", k, x_t))
        return torch.where(self.extract("alphas_cumprod", k, x_t) > 0, eps, x_t)

    def xstart_from_v(self, x_t: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.extract("sqrt_alphas_cumprod", k, x_t) * x_t - self.extract("sqrt_one_minus_alphas_cumprod", k, x_t) * v

    def eps_from_v(self, x_t: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.extract("sqrt_one_minus_alphas_cumprod", k, x_t) * x_t + self.extract("sqrt_alphas_cumprod", k, x_t) * v

    def v_from(self, x_start: Tensor, eps: Tensor, k: Tensor) -> Tensor:
        """``v = sqrt(abar_k) eps - sqrt(1 - abar_k) x_start``."""
        return self.extract("sqrt_alphas_cumprod", k, eps) * eps - self.extract("sqrt_one_minus_alphas_cumprod", k, eps) * x_start

    def target(self, x_start: Tensor, noise: Tensor, k: Tensor) -> Tensor:
        """What the model regresses on for this process's prediction type."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "x_start":
            return x_start
        return self.v_from(x_start, noise, k)

    def predict_xstart(self, x_t: Tensor, k: Tensor, output: Tensor) -> Tensor:
        """``x_start`` implied by a (mean-part) model output of this process's prediction type."""
        if self.prediction == "epsilon":
            return self.xstart_from_eps(x_t, k, output)
        if self.prediction == "x_start":
            return output
        return self.xstart_from_v(x_t, k, output)

    # -- the reverse process -------------------------------------------------------
    def split_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean part shaped like `x`, variance part or None). Learned variances take the second half of dim 1."""
        if not self.learned_variance:
            if output.shape != x.shape:
                raise ValueError(f"model output {tuple(output.shape)} must match the data {tuple(x.shape)} "
                                 f"for variance = {self.variance!r}")
            return output, None
        expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(f"variance = {self.variance!r} needs the model to output twice the data's channels: "
                             f"expected {expected}, got {tuple(output.shape)} (mlp backbone: out_channels_mult = 2)")
        mean_part, var_part = output.split(x.shape[1], dim=1)
        return mean_part, var_part

    def xstart_from_output(self, output: Tensor, x: Tensor, k: Tensor, clip_denoised: bool = False) -> Tensor:
        """``x_start`` predicted by the model output at ``(x = x_k, k)`` (clamped to [-1, 1] with `clip_denoised`)."""
        x_start = self.predict_xstart(x, k, self.split_output(output, x)[0])
        return x_start.clamp(-1.0, 1.0) if clip_denoised else x_start

    def p_mean_variance(self, output: Tensor, x: Tensor, k: Tensor, clip_denoised: bool = False) -> PMeanVariance:
        """``p(x_{k-1} | x_k)`` from the model output at ``(x = x_k, k)``; ``x_start`` clamped to [-1, 1] with `clip_denoised`."""
        var_part = self.split_output(output, x)[1]
        if self.variance in _FIXED_VARIANCE:
            var_name, log_var_name = _FIXED_VARIANCE[self.variance]
            var = self.extract(var_name, k, x).expand_as(x)
            log_var = self.extract(log_var_name, k, x).expand_as(x)
        else:
            if self.variance == "learned":
                log_var = var_part
            else:  # learned_range: [-1, 1] spans [log posterior variance, log beta]
                frac = (var_part + 1.0) / 2.0
                log_var = (frac * self.extract("log_betas", k, x)
                           + (1.0 - frac) * self.extract("posterior_log_variance_clipped", k, x))
            var = torch.exp(log_var)
        pred_xstart = self.xstart_from_output(output, x, k, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, k)
        return PMeanVariance(mean=mean, variance=var, log_variance=log_var, pred_xstart=pred_xstart)

    def ddim_sigma(self, k: Tensor, eta: float, like: Tensor) -> Tensor:
        """DDIM's noise scale ``eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev)``, ``(B, 1, ..)``.

        With ``eta = 1`` its square is the posterior variance (the ancestral fixed_small variance).
        """
        ab, ab_prev = self.extract("alphas_cumprod", k, like), self.extract("alphas_cumprod_prev", k, like)
        return eta * torch.sqrt((1.0 - ab_prev) / (1.0 - ab)) * torch.sqrt(1.0 - ab / ab_prev)

    # -- the variational bound -------------------------------------------------------
    def vb_terms_bpd(self, output: Tensor, x_start: Tensor, x_t: Tensor, k: Tensor, clip_denoised: bool = False,
                     bins: int = 256) -> tuple[Tensor, Tensor]:
        """One term of the variational bound per example, in bits per dimension: ``(B,)``, and ``pred_xstart``.

        ``KL(q(x_{k-1} | x_k, x_start) || p(x_{k-1} | x_k))`` for ``k > 0``; the negative
        discretized Gaussian log-likelihood of ``x_start`` under ``p(x_start | x_0)`` for ``k = 0``.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, k)
        p = self.p_mean_variance(output, x_t, k, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, p.mean, 0.5 * p.log_variance, bins)) / math.log(2.0)
        return torch.where(k.to(kl.device) == 0, nll, kl), p.pred_xstart

    def prior_bpd(self, x_start: Tensor) -> Tensor:
        """``KL(q(x_{T-1} | x_start) || N(0, I))`` in bits per dimension, ``(B,)``."""
        k = self.steps(self.num_timesteps - 1, x_start.shape[0], x_start.device)
        mean, _, log_var = self.q_mean_variance(x_start, k)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)

    def training_losses(self, output: Tensor, x_start: Tensor, x_t: Tensor, k: Tensor, noise: Tensor,
                        loss_type: str = "mse") -> dict[str, Tensor]:
        """Per-example losses ``(B,)`` for the model output at ``(x_t, k)`` (guided-diffusion's ``training_losses``).

        * ``kl``: the bound term `vb_terms_bpd` (no clipping); ``rescaled_kl``: times ``T``.
        * ``mse``: ``mean_flat((target - output)^2)``; with a learned variance plus the bound
          term computed with the mean part detached (it trains only the variance);
          ``rescaled_mse``: that term times ``T / 1000`` (improved-diffusion's hybrid loss).

        Returns ``{"loss"}`` plus ``"mse"`` and ``"vb"`` where they apply.
        """
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
        if loss_type in ("kl", "rescaled_kl"):
            vb, _ = self.vb_terms_bpd(output, x_start, x_t, k, clip_denoised=False)
            return {"loss": vb * self.num_timesteps if loss_type == "rescaled_kl" else vb}
        mean_part, var_part = self.split_output(output, x_t)
        terms = {"mse": mean_flat((self.target(x_start, noise, k) - mean_part) ** 2)}
        if var_part is not None:
            frozen = torch.cat([mean_part.detach(), var_part], dim=1)
            vb, _ = self.vb_terms_bpd(frozen, x_start, x_t, k, clip_denoised=False)
            terms["vb"] = vb * (self.num_timesteps / 1000.0) if loss_type == "rescaled_mse" else vb
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def calc_bpd_loop(self, model_fn: Callable[[Tensor, Tensor], Tensor], x_start: Tensor, *, clip_denoised: bool = True,
                      generator: torch.Generator | None = None, bins: int = 256) -> dict[str, Tensor]:
        """The whole variational bound of `x_start` ``(B, ...)`` (guided-diffusion's ``calc_bpd_loop``).

        For each step ``k = T-1 .. 0``: draw ``x_k ~ q(x_k | x_start)``, evaluate
        ``model_fn(x_k, k)`` and its bound term. Returns, in bits per dimension,
        ``total_bpd (B,)`` = ``prior_bpd (B,)`` + the sum over steps of ``vb (B, T)``
        (column ``k`` is step ``k``; column 0 is the decoder NLL), and the per-step
        ``xstart_mse (B, T)`` and ``mse (B, T)`` (of the implied epsilon).
        """
        batch, T = x_start.shape[0], self.num_timesteps
        vb, xstart_mse, mse = [None] * T, [None] * T, [None] * T
        for i in reversed(range(T)):
            k = self.steps(i, batch, x_start.device)
            noise = randn_like(x_start, generator)
            x_t = self.q_sample(x_start, k, noise)
            out = model_fn(x_t, k)
            vb[i], pred_xstart = self.vb_terms_bpd(out, x_start, x_t, k, clip_denoised, bins)
            xstart_mse[i] = mean_flat((pred_xstart - x_start) ** 2)
            mse[i] = mean_flat((self.eps_from_xstart(x_t, k, pred_xstart) - noise) ** 2)
        vb_t = torch.stack(vb, dim=1)
        prior = self.prior_bpd(x_start)
        return {"total_bpd": vb_t.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb_t,
                "xstart_mse": torch.stack(xstart_mse, dim=1), "mse": torch.stack(mse, dim=1)}


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like `x`, drawn with `generator` (on its device) and moved to `x`'s device."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
