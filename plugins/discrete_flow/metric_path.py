r"""Metric-induced discrete probability paths and their kinetic-optimal velocity (Shaul et al. 2024).

Tokens ``{0, ..., V-1}`` carry a distance ``d(x, x')`` (``d(x, x) = 0``, ``d >= 0``). The
conditional path of one position weighs every token by its distance to the data token:

    p_t(x | x_1) = exp(-beta_t d(x, x_1)) / Z_t(x_1),     Z_t(x_1) = sum_x exp(-beta_t d(x, x_1))

with ``beta_t = c (t / (1 - t))^a`` rising from ``beta_0 = 0`` (the uniform source) to
``beta_1 = inf`` (``delta_{x_1}``). Positions are independent given ``x_1``; the source draw
``x_0`` plays no part (``p_t(. | x_1)`` does not depend on it), so `sample` ignores it.

**The velocity.** For a path ``p_t`` the kinetic-optimal probability velocity of Shaul et
al. (2024) is ``u_t(x, z) = [dp_t(x)/dt p_t(z) - p_t(x) dp_t(z)/dt]_+ / p_t(z)`` (``x != z``).
Here ``dp_t(x | x_1)/dt = p_t(x | x_1) beta'_t (E_{p_t}[d(., x_1)] - d(x, x_1))``, so

    u_t(x, z | x_1) = p_t(x | x_1) beta'_t [d(z, x_1) - d(x, x_1)]_+          (x != z)

with ``beta'_t = c a t^(a-1) / (1 - t)^(a+1)``: a token only jumps to tokens closer to
``x_1``. It satisfies the Kolmogorov equation
``sum_z u(x, z) p_t(z) - p_t(x) sum_z u(z, x) = dp_t(x | x_1)/dt``. The marginal velocity
the solver follows is the posterior average

    u_t(x, z) = sum_{x_1} p_{1|t}(x_1 | z) u_t(x, z | x_1)

(``O(V^2)`` per position), and the training loss / ELBO integrand is the generalized
KL between the conditional and the model's rates (`path.rate_divergence`).

**Metrics** (``metric``):

* ``"absolute"``: ``|x - x'|``, for ordinal tokens (grey levels, quantised coordinates);
* ``"squared"``: ``(x - x')^2``;
* ``"hamming"``: ``[x != x']``. This path is then the mixture path with a uniform source
  and ``kappa_t = (V / Z_t - 1) / (V - 1)``, ``Z_t = 1 + (V - 1) exp(-beta_t)``, and its
  velocity the mixture velocity ``kappa'_t / (1 - kappa_t) (p_{1|t} - delta_z)``.

**The posterior.** Given ``x_1`` the positions of ``x_t`` are independent and ``x_t^i`` depends
on ``x_1^i`` alone, so by Bayes' rule

    p_{1|t}(x_1^i | x_t) ~ p_t(x_t^i | x_1^i) p(x_1^i | x_t^{-i})

exactly. With ``add_likelihood`` (the default) the model's logits stand for the second factor
and the path adds ``log p_t(x_t^i | x_1^i) = -beta_t d(x_t^i, x_1^i) - log Z_t(x_1^i)``: as
``beta_t`` grows the posterior concentrates on ``x_t^i`` by construction (as the mask
source's carry-over does for the mixture path) instead of the network having to produce
logit gaps of order ``beta_t``, which the generalized KL (weighted by
``beta'_t ~ (1 - t)^-2``) punishes near ``t = 1``.

The data must have no mask token (the source is uniform over all ``V`` tokens; a mask
source is the mixture path's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from torch import Tensor
from torch.nn import functional as F

from core.interfaces import DataSpec, PathSample
from core.nn import append_dims
from core.rng import ExampleRandom
from registry import ConfigError

from .path import KAPPA_EPS, DiscretePath, categorical, rate_divergence, uniform


@attrs.define
class MetricPathConfig:
    """Options of the metric_discrete path.

    Attributes:
        metric: distance between token ids: "absolute" |x - x'|, "squared" (x - x')^2 or
            "hamming" [x != x'].
        beta_scale: c in beta_t = c (t / (1 - t))^a.
        beta_power: a in beta_t = c (t / (1 - t))^a.
        add_likelihood: the model's logits stand for p(x_1^i | x_t^{-i}) and the path adds
            log p_t(x_t^i | x_1^i) (exact by Bayes' rule; module doc). Without it the logits are
            the posterior's.
    """

    metric: Literal["absolute", "squared", "hamming"] = "absolute"
    beta_scale: float = 1.0
    beta_power: float = 1.0
    add_likelihood: bool = True

    def __attrs_post_init__(self) -> None:
        for key in ("beta_scale", "beta_power"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"expected a positive number, got {getattr(self, key)!r}", (key,))


def token_distances(metric: str, vocab_size: int) -> Tensor:
    """``D (V, V)`` float64 with ``D[x, x'] = d(x, x')`` for the named metric."""
    ids = torch.arange(vocab_size, dtype=torch.float64)
    diff = ids[:, None] - ids[None, :]
    if metric == "absolute":
        return diff.abs()
    if metric == "squared":
        return diff.square()
    if metric == "hamming":
        return (diff != 0).double()
    raise ValueError(f"unknown metric {metric!r}")


class MetricInducedPath(DiscretePath):
    """See the module docstring.

    Args:
        distances: ``D (V, V)``, ``D[x, x'] = d(x, x')`` (zero diagonal, non-negative).
        beta_scale: ``c``.
        beta_power: ``a``.
        add_likelihood: add ``log p_t(x_t^i | x_1^i)`` to the model's logits.
    """

    mask_token = None

    def __init__(self, distances: Tensor, beta_scale: float = 1.0, beta_power: float = 1.0,
                 add_likelihood: bool = False):
        d = distances.double()
        if d.ndim != 2 or d.shape[0] != d.shape[1] or (d.diagonal() != 0).any() or (d < 0).any():
            raise ValueError("distances must be a square non-negative matrix with a zero diagonal")
        self.distances, self.beta_scale, self.beta_power = d, float(beta_scale), float(beta_power)
        self.vocab_size = self.data_vocab = d.shape[0]
        self.add_likelihood = add_likelihood

    # -- the schedule --------------------------------------------------------------------
    def beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(beta_t, d beta_t / dt)`` in float64, shaped like ``t`` (``1 - t`` and ``t`` are
        clamped at 1e-12, so both stay finite at the ends)."""
        t = t.double()
        c, a = self.beta_scale, self.beta_power
        one_minus = (1.0 - t).clamp_min(KAPPA_EPS)
        beta = c * (t / one_minus) ** a
        d_beta = c * a * t.clamp_min(KAPPA_EPS) ** (a - 1.0) / one_minus ** (a + 1.0)
        return beta, d_beta

    def conditional_probs(self, x_1: Tensor, t: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """``p_t(. | x_1)`` ``(B, ..., V)`` for data tokens ``x_1 (B, ...)`` and ``t (B,)``."""
        d = self.distances.to(device=x_1.device, dtype=dtype)
        beta = append_dims(self.beta(t)[0].to(x_1.device, dtype), x_1.ndim + 1)
        return torch.softmax(-beta * d.T[x_1], dim=-1)

    # -- the path --------------------------------------------------------------------------
    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor, generator: torch.Generator | None = None,
               draw: ExampleRandom | None = None) -> PathSample:
        """``x_t ~ p_t(. | x_1)`` per position of ``x_1 (B, ...)`` at ``t (B,)`` (float64 inverse CDF;
        the uniforms from `draw`, stream ``"path/keep"``, when given). ``x_0`` is not used; ``target``
        is ``x_1``."""
        u = (draw.rand(x_1.shape[1:], "path/keep", device=x_1.device) if draw is not None
             else uniform(x_1.shape, generator, x_1.device))
        x_t = categorical(self.conditional_probs(x_1, t), dtype=torch.float64, u=u)
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=x_t, target=x_1)

    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, *, dtype: torch.dtype | None = None,
                      draw: ExampleRandom | None = None) -> Tensor:
        """``(B, ...)`` tokens uniform over the vocabulary (``p_0``: ``beta_0 = 0``); int64."""
        if draw is not None:
            return draw.randint(0, self.vocab_size, tuple(shape)[1:], "source", device=device)
        gen_device = generator.device if generator is not None else device
        return torch.randint(self.vocab_size, tuple(shape), generator=generator, device=gen_device).to(device)

    def source_probs(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The uniform ``p_0``, ``(V,)``."""
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size, device=device, dtype=dtype)

    def log_posterior(self, logits: Tensor, x_t: Tensor, t: Tensor | None = None) -> Tensor:
        """``log p_{1|t}(. | x_t)`` ``(B, ..., V)`` (float32 or wider) from the model logits ``(B, ..., V)``:
        their ``log_softmax``, or with ``add_likelihood`` that of ``logits + log p_t(x_t^i | x_1^i)``
        (module doc; needs ``t (B,)``)."""
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries, the vocabulary {self.vocab_size}")
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if self.add_likelihood:
            if t is None:
                raise ValueError("add_likelihood: the posterior needs the time t")
            logits = logits + self.log_likelihood(x_t, t).to(logits.dtype)
        return torch.log_softmax(logits, dim=-1)

    def log_likelihood(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``log p_t(x_t^i | x_1^i = k)`` for every ``k``, ``(B, ..., V)`` float64:
        ``-beta_t d(x_t^i, k) - log Z_t(k)``."""
        d = self.distances.to(x_t.device)
        beta = self.beta(t)[0].to(x_t.device)
        log_z = torch.logsumexp(-beta[:, None, None] * d, dim=1)  # (B, k): log sum_x exp(-beta d(x, k))
        log_z = log_z.reshape(log_z.shape[0], *(1,) * (x_t.ndim - 1), -1)
        return -append_dims(beta, x_t.ndim + 1) * d[x_t] - log_z

    # -- velocities --------------------------------------------------------------------------
    def rate_kernel(self, x_t: Tensor, t: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """``K (B, ..., V, V)`` with ``K[..., k, x] = u_t(x, x_t | x_1 = k)``, the conditional rates from
        the state ``x_t (B, ...)`` at ``t (B,)`` for every data token ``k``:
        ``beta'_t p_t(x | k) [d(x_t, k) - d(x, k)]_+`` (zero at ``x = x_t``)."""
        d = self.distances.to(device=x_t.device, dtype=dtype)
        beta, d_beta = (append_dims(v.to(x_t.device, dtype), x_t.ndim + 2) for v in self.beta(t))
        p_cond = torch.softmax(-beta * d.T, dim=-1)  # (B, 1.., k, x) = p_t(x | k)
        gap = (d[x_t].unsqueeze(-1) - d.T).clamp_min(0.0)  # (B, ..., k, x) = [d(x_t, k) - d(x, k)]_+
        return (d_beta * p_cond) * gap

    def velocity(self, posterior: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The marginal velocity ``u_t(., x_t)`` ``(B, ..., V)`` (module doc): off-diagonal rates
        ``sum_k p_{1|t}(k) u_t(x, x_t | k)`` (`rate_kernel`), and minus their sum at ``x_t``. The
        conditional velocity is the one-hot posterior of ``x_1``."""
        rates = torch.einsum("...k,...kx->...x", posterior, self.rate_kernel(x_t, t, posterior.dtype))
        return rates.scatter(-1, x_t.unsqueeze(-1), -rates.sum(-1, keepdim=True))

    def generalized_kl(self, log_p: Tensor, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``D(u_t(., x_t | x_1) || u^theta_t(., x_t))`` per position ``(B, ...)`` (`rate_divergence`
        of the off-diagonal rates; both from one `rate_kernel`)."""
        kernel = self.rate_kernel(x_t, t, log_p.dtype)
        u_model = torch.einsum("...k,...kx->...x", log_p.exp(), kernel)
        u_ref = kernel.gather(-2, x_1[..., None, None].expand(*x_1.shape, 1, self.vocab_size)).squeeze(-2)
        return rate_divergence(u_ref, u_model)


def make_metric_discrete(config: MetricPathConfig, spec: DataSpec, scheduler: object | None = None
                         ) -> MetricInducedPath:
    """Path factory: needs discrete data without a mask token; the path has its own schedule ``beta_t``."""
    if spec.kind != "discrete" or spec.vocab_size <= 0:
        raise ConfigError(f"the metric_discrete path needs discrete data (token ids); the data is {spec.kind!r}",
                          ("plugin",))
    if scheduler is not None:
        raise ConfigError("the metric_discrete path sets its own schedule beta_t = beta_scale (t / (1 - t))"
                          "^beta_power: remove the [scheduler] section", ("plugin",))
    if spec.extra.get("mask_token") is not None:
        raise ConfigError("the metric_discrete path starts from the uniform distribution over all tokens; the "
                          "data declares a mask token (drop mask_token / with_mask_token, or use "
                          "plugin = \"mixture_discrete\" with source = \"mask\")", ("plugin",))
    return MetricInducedPath(token_distances(config.metric, spec.vocab_size), config.beta_scale, config.beta_power,
                             config.add_likelihood)
