"""The mixture discrete probability path and its probability velocities.

Tokens live in ``{0, ..., V-1}`` (``V = spec.vocab_size``). Every position
``i`` of ``x_t`` independently holds its data token with probability
``kappa_t`` and its source token otherwise:

    p_t(x^i | x_0, x_1) = (1 - kappa_t) delta_{x_0^i}(x^i) + kappa_t delta_{x_1^i}(x^i)

with ``kappa_t`` from a convex scheduler (``kappa_0 = 0``, ``kappa_1 = 1``).
The source ``x_0`` is either

* ``"uniform"``: i.i.d. uniform over the data tokens, or
* ``"mask"``: every position the mask token.

**The mask token.** Backbones size their embeddings and logits from
``spec.vocab_size`` alone, so a mask token must be part of the data's
vocabulary: a data source that supports it declares ``spec.extra["mask_token"]
= V - 1`` (the last id, never produced by the data) and counts it in
``spec.vocab_size``. The ``text`` and ``toy2d_discrete`` sources do so with
``mask_token = true``; any other discrete source gets one by wrapping it in the
``with_mask_token`` data component. The mask is never a valid *data* token:
posteriors give it probability zero (its logit is ignored), and a uniform
source draws only data tokens.

**Posteriors.** Models return logits ``(B, ..., V)`` of the posterior
``p_{1|t}(x_1^i | x_t)``. With the mask source a position that is not masked
already holds its data token (the mixture path never changes a revealed
token), so its posterior is the one-hot of ``x_t^i`` whatever the model says
("carry-over": exact, and it makes the loss of such positions zero).

**Velocities.** The marginal probability velocity of position ``i`` in state
``z = x_t`` is

    u_t(x^i, z) = kappa'_t / (1 - kappa_t) * [p_{1|t}(x^i | z) - delta_{z^i}(x^i)]

and, for any ``beta_t >= 0``, adding ``beta_t`` times the divergence-free field

    v_t(x^i, z) = kappa'_t / (kappa_t (1 - kappa_t)) * [(1 - kappa_t) p_0(x^i) + kappa_t p_{1|t}(x^i | z) - delta_{z^i}(x^i)]

keeps the marginals ``p_t`` (its probability flux vanishes because
``p_t^i = (1 - kappa_t) p_0 + kappa_t p_1^i``). Both have rows summing to zero
and non-negative off-diagonal entries (jump rates).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from torch import Tensor
from torch.nn import functional as F

from core.interfaces import ConvexScheduler, DataSpec, Path, PathSample
from core.rng import ExampleRandom
from core.nn import append_dims
from registry import ConfigError

#: Smallest ``kappa`` and ``1 - kappa`` used when dividing by them (the rates
#: they produce are then so large that a step jumps with probability one).
KAPPA_EPS = 1e-12


@attrs.define
class MixturePathConfig:
    """Options of the mixture_discrete path.

    Attributes:
        source: "uniform" (uniform over the data tokens) or "mask" (every
            position the mask token; the data must declare one, see the module doc).
    """

    source: Literal["uniform", "mask"] = "uniform"


def categorical(weights: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                u: Tensor | None = None) -> Tensor:
    """One draw per row from unnormalised non-negative ``weights (..., V)`` -> LongTensor ``(...)``.

    Inverse-CDF sampling in `dtype` (float64 avoids the rounding that makes
    float32 sampling misrepresent rare tokens). A token of weight zero is never
    drawn (rows of all zeros give an arbitrary index). The uniforms ``u (...)`` in
    [0, 1) are given, or come from `generator` (on its device) and are moved to the
    weights' device.
    """
    w = weights.to(dtype)
    cdf = w.cumsum(-1)
    if u is None:
        device = generator.device if generator is not None else w.device
        u = torch.rand(w.shape[:-1], generator=generator, device=device, dtype=dtype).to(w.device)
    u = u.to(dtype) * cdf[..., -1]
    idx = torch.searchsorted(cdf.contiguous(), u.unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    # u rounded up to the total: take the last token of positive weight
    last = (w > 0).cumsum(-1).argmax(-1)
    return torch.where(idx >= w.shape[-1], last, idx)


def uniform(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    """Uniforms in [0, 1) of `shape` drawn with `generator` (on its device), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(*shape, generator=generator, device=gen_device).to(device)


def rate_divergence(u_ref: Tensor, u_model: Tensor) -> Tensor:
    """The generalized KL between rate vectors, ``(B, ...)`` from two ``(B, ..., V)``:

        D(a || b) = sum_x a(x) log(a(x) / b(x)) - a(x) + b(x)

    (zero where both are zero; the diagonal entries must be zero in both, as jump
    rates to the current state are). Non-negative, zero exactly when ``a = b``; the
    integrand of a CTMC path's ELBO (Campbell et al. 2022; Shaul et al. 2024).
    """
    pos = u_ref > 0
    tiny = torch.finfo(u_model.dtype).tiny
    # the logs see 1 where a(x) = 0 (their term is 0), so no 0 * inf reaches the gradient; b(x) is
    # clamped at the smallest normal number (an underflowed rate is a huge, finite loss)
    log_ref = torch.where(pos, u_ref, 1.0).log()
    log_model = torch.where(pos, u_model.clamp_min(tiny), 1.0).log()
    return (torch.where(pos, u_ref * (log_ref - log_model), 0.0) - u_ref + u_model).sum(-1)


def generalized_kl(log_p: Tensor, x_1: Tensor, x_t: Tensor, jump_coefficient: Tensor) -> Tensor:
    """The mixture path's ELBO integrand per position ``(B, ...)`` (`plugins.discrete_flow.objective`).

    Args:
        log_p: ``log p_{1|t}(. | x_t)`` ``(B, ..., V)``.
        x_1: data tokens ``(B, ...)``.
        x_t: tokens on the path ``(B, ...)``.
        jump_coefficient: ``kappa'_t / (1 - kappa_t)`` ``(B,)``.
    """
    log_p_x1 = log_p.gather(-1, x_1.unsqueeze(-1)).squeeze(-1)
    p_xt = log_p.gather(-1, x_t.unsqueeze(-1)).squeeze(-1).exp()
    coef = append_dims(jump_coefficient, x_1.ndim).to(log_p.dtype)
    return coef * torch.where(x_t == x_1, 1.0 - p_xt, -p_xt - log_p_x1)


class DiscretePath(Path):
    """A factorized discrete probability path over token ids ``{0, ..., V-1}``.

    What the discrete objective, solver and metrics use: the vocabulary, the
    source, the posterior ``p_{1|t}`` from model logits, the marginal probability
    velocity ``u_t(., x_t)`` built from it, and the ELBO integrand between the
    conditional velocity ``u_t(., x_t | x_1)`` and the model's velocity. A path
    that also has a divergence-free field sets ``has_divergence_free``.

    Attributes:
        vocab_size: ``V``, the model's vocabulary.
        mask_token: the mask id (``V - 1``) or None.
        data_vocab: number of data tokens (ids ``0 .. data_vocab - 1``).
    """

    vocab_size: int
    mask_token: int | None
    data_vocab: int
    #: whether `divergence_free` exists (the solver's ``div_free`` needs it)
    has_divergence_free: bool = False

    @abc.abstractmethod
    def log_posterior(self, logits: Tensor, x_t: Tensor, t: Tensor | None = None) -> Tensor:
        """``log p_{1|t}(. | x_t)`` ``(B, ..., V)`` from model logits ``(B, ..., V)`` at the state
        ``x_t (B, ...)`` and time ``t (B,)`` (a path whose posterior does not depend on ``t`` ignores it)."""

    def posterior(self, logits: Tensor, x_t: Tensor, t: Tensor | None = None) -> Tensor:
        """``p_{1|t}(. | x_t)`` ``(B, ..., V)``; see `log_posterior`."""
        return self.log_posterior(logits, x_t, t).exp()

    @abc.abstractmethod
    def velocity(self, posterior: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The marginal probability velocity ``u_t(., x_t)`` ``(B, ..., V)`` from the posterior
        ``(B, ..., V)``, the state ``x_t (B, ...)`` and ``t (B,)``: rows sum to zero, off-diagonal
        entries are jump rates."""

    @abc.abstractmethod
    def generalized_kl(self, log_p: Tensor, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per position ``(B, ...)``: ``D(u_t(., x_t | x_1) || u^theta_t(., x_t))`` (`rate_divergence`),
        the model's velocity built from ``log_p = log p^theta_{1|t} (B, ..., V)``."""

    @abc.abstractmethod
    def source_probs(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The source distribution ``p_0`` of one position, ``(V,)``."""


class MixtureDiscretePath(DiscretePath):
    """See the module docstring.

    Args:
        scheduler: a convex scheduler (``kappa_t = alpha_t``).
        vocab_size: ``V``, the model's vocabulary (the mask token included when there is one).
        source: "uniform" or "mask".
        mask_token: id of the mask token (must be ``V - 1``), or None when the vocabulary has none.
    """

    def __init__(self, scheduler: ConvexScheduler, vocab_size: int, source: str = "uniform",
                 mask_token: int | None = None):
        if source not in ("uniform", "mask"):
            raise ValueError(f"unknown source {source!r}")
        if mask_token is not None and mask_token != vocab_size - 1:
            raise ValueError(f"the mask token must be the last id {vocab_size - 1}, got {mask_token}")
        if source == "mask" and mask_token is None:
            raise ValueError("source 'mask' needs a vocabulary with a mask token")
        self.scheduler, self.vocab_size, self.source, self.mask_token = scheduler, vocab_size, source, mask_token
        #: number of data tokens (ids 0 .. data_vocab - 1)
        self.data_vocab = vocab_size - (mask_token is not None)

    has_divergence_free = True

    # -- the path --------------------------------------------------------------------
    def kappa(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(kappa_t, d kappa_t / dt)`` in float64, each shaped like ``t``."""
        s = self.scheduler(t.double())
        return s.alpha_t, s.d_alpha_t

    def jump_coefficient(self, t: Tensor) -> Tensor:
        """``kappa'_t / (1 - kappa_t)`` (float64, shaped like ``t``): the rate at which a
        token not yet at its data value jumps to it."""
        kappa, d_kappa = self.kappa(t)
        return d_kappa / (1.0 - kappa).clamp_min(KAPPA_EPS)

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor, generator: torch.Generator | None = None,
               draw: ExampleRandom | None = None) -> PathSample:
        """``x_t`` keeps each data token of ``x_1 (B, ...)`` with probability ``kappa_t`` (``t (B,)``)
        and the source token of ``x_0`` otherwise. ``target`` is ``x_1`` (models predict its posterior).
        The uniforms come from `draw` (per example, `core.rng`, stream ``"path/keep"``) when given."""
        kappa = append_dims(self.kappa(t)[0], x_1.ndim)
        u = (draw.rand(x_1.shape[1:], "path/keep", device=x_1.device) if draw is not None
             else uniform(x_1.shape, generator, x_1.device))
        keep = u.double() < kappa
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=torch.where(keep, x_1, x_0), target=x_1)

    def sample_source(self, shape: Sequence[int], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, *, dtype: torch.dtype | None = None,
                      draw: ExampleRandom | None = None) -> Tensor:
        """``(B, ...)`` mask tokens, or tokens uniform over the data vocabulary (drawn from `draw`,
        per example with stream ``"source"``, when given, else from `generator`); int64 (`dtype` is
        not used: tokens are ids)."""
        if self.source == "mask":
            return torch.full(tuple(shape), self.mask_token, dtype=torch.long, device=device)
        if draw is not None:
            return draw.randint(0, self.data_vocab, tuple(shape)[1:], "source", device=device)
        gen_device = generator.device if generator is not None else device
        return torch.randint(self.data_vocab, tuple(shape), generator=generator, device=gen_device).to(device)

    def source_probs(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The source distribution ``p_0`` of one position, ``(V,)``."""
        p = torch.zeros(self.vocab_size, device=device, dtype=dtype)
        if self.source == "mask":
            p[self.mask_token] = 1.0
        else:
            p[: self.data_vocab] = 1.0 / self.data_vocab
        return p

    # -- posteriors ------------------------------------------------------------------
    def log_posterior(self, logits: Tensor, x_t: Tensor, t: Tensor | None = None) -> Tensor:
        """``log p_{1|t}(. | x_t)`` ``(B, ..., V)`` (float32 or wider) from model logits ``(B, ..., V)``
        (``t`` is not used).

        The mask token gets probability zero; with the mask source, positions
        of ``x_t (B, ...)`` that are not masked get the one-hot of their token.
        """
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries, the vocabulary {self.vocab_size}")
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if self.mask_token is not None:
            logits = logits.index_fill(-1, torch.tensor([self.mask_token], device=logits.device), float("-inf"))
        log_p = torch.log_softmax(logits, dim=-1)
        if self.source == "mask":
            revealed = (x_t != self.mask_token).unsqueeze(-1)
            log_onehot = torch.full_like(log_p, float("-inf")).scatter_(-1, x_t.unsqueeze(-1), 0.0)
            log_p = torch.where(revealed, log_onehot, log_p)
        return log_p

    # -- probability velocities ------------------------------------------------------------
    def velocity(self, posterior: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The marginal probability velocity ``u_t(., x_t)`` ``(B, ..., V)`` (module doc)
        from the posterior ``(B, ..., V)``, the state ``x_t (B, ...)`` and ``t (B,)``."""
        coef = append_dims(self.jump_coefficient(t), posterior.ndim).to(posterior.dtype)
        return coef * (posterior - F.one_hot(x_t, self.vocab_size).to(posterior.dtype))

    def generalized_kl(self, log_p: Tensor, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The ELBO integrand per position ``(B, ...)`` in closed form: with ``lambda_t`` the
        `jump_coefficient` and ``delta = [x_t = x_1]``,
        ``lambda_t (delta - p^theta(x_t) - (1 - delta) log p^theta(x_1))``
        (`generalized_kl`)."""
        return generalized_kl(log_p, x_1, x_t, self.jump_coefficient(t))

    def divergence_free(self, posterior: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The divergence-free field ``v_t(., x_t)`` ``(B, ..., V)`` of the module doc (add ``beta_t`` times it)."""
        kappa, d_kappa = self.kappa(t)
        coef = d_kappa / (kappa.clamp_min(KAPPA_EPS) * (1.0 - kappa).clamp_min(KAPPA_EPS))
        kappa = append_dims(kappa, posterior.ndim).to(posterior.dtype)
        coef = append_dims(coef, posterior.ndim).to(posterior.dtype)
        p_0 = self.source_probs(posterior.device, posterior.dtype)
        onehot = F.one_hot(x_t, self.vocab_size).to(posterior.dtype)
        return coef * ((1.0 - kappa) * p_0 + kappa * posterior - onehot)


def make_mixture_discrete(config: MixturePathConfig, spec: DataSpec,
                          scheduler: ConvexScheduler | None = None) -> MixtureDiscretePath:
    """Path factory: needs discrete data and the experiment's convex ``[scheduler]``."""
    if spec.kind != "discrete" or spec.vocab_size <= 0:
        raise ConfigError(f"the mixture_discrete path needs discrete data (token ids); the data is {spec.kind!r}",
                          ("plugin",))
    if scheduler is None:
        raise ConfigError("the mixture_discrete path needs a [scheduler] section with a convex scheduler "
                          "(e.g. plugin = \"cond_ot\" or \"polynomial\")", ("plugin",))
    if not isinstance(scheduler, ConvexScheduler):
        raise ConfigError(f"the mixture_discrete path needs a convex scheduler (one with kappa_t); "
                          f"{type(scheduler).__name__} is not one", ("plugin",))
    mask = spec.extra.get("mask_token")
    if config.source == "mask" and mask is None:
        raise ConfigError(
            "source = \"mask\" needs a mask token in the data's vocabulary: set mask_token = true in [data] "
            "(text, toy2d_discrete), or wrap the data: [data] plugin = \"with_mask_token\", "
            "data = { plugin = ..., ... }", ("source",))
    if mask is not None and mask != spec.vocab_size - 1:
        raise ConfigError(f"the data declares mask token {mask}; it must be the last id {spec.vocab_size - 1}",
                          ("source",))
    return MixtureDiscretePath(scheduler, spec.vocab_size, config.source, mask)
