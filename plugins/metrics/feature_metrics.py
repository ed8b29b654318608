"""Feature-space sample metrics: Frechet distance, kernel distance (KID), precision and recall.

Each is a ``torchmetrics.Metric`` following ``core.interfaces.SampleMetric``:
``update(samples, real)`` maps a batch ``(B, ...)`` to features ``(B, F)``
with the configured extractor (`plugins.metrics.features`) and appends them to
a list state (``dist_reduce_fx="cat"``), so under several processes every rank
contributes exactly its own examples; ``compute()`` sees all of them.

With ``phi`` the features of reference (``r``) and generated (``g``) examples:

* Frechet distance (FID with Inception features; Heusel et al. 2017)::

      FD = ||mu_r - mu_g||^2 + tr(S_r) + tr(S_g) - 2 tr((S_r^{1/2} S_g S_r^{1/2})^{1/2})

  with sample means ``mu`` and unbiased covariances ``S``; computed in float64
  through symmetric eigendecompositions (``S_r^{1/2} S_g S_r^{1/2}`` is
  symmetric positive semi-definite, so its square root has the same trace as
  ``(S_r S_g)^{1/2}`` and is found stably).
* KID (Binkowski et al. 2018): the unbiased estimate of the squared MMD with
  the polynomial kernel ``k(a, b) = (a.b / F + 1)^3``, averaged over
  ``subsets`` random subsets of ``subset_size`` examples of each set (the whole
  sets, once, when both are no larger than ``subset_size``)::

      MMD^2_u = sum_{i!=j} k(r_i, r_j) / (m(m-1)) + sum_{i!=j} k(g_i, g_j) / (n(n-1)) - 2 sum_{i,j} k(r_i, g_j) / (mn)

* Precision and recall (Kynkaenniemi et al. 2019): each reference feature
  is the centre of a ball reaching its ``k``-th nearest other reference
  feature; precision is the fraction of generated features inside at least
  one reference ball, recall the fraction of reference features inside at
  least one generated ball (built the same way from the generated features).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor
from torchmetrics import Metric

from core.interfaces import DataSource, DataSpec
from registry import ConfigError

from .features import FEATURE_OPTIONS_DOC, FeatureConfig, FeatureExtractor, build_extractor


# --------------------------------------------------------------------------- math (float64)
def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``; ``mu (F,)``, ``sigma (F, F)``."""
    mu1, sigma1, mu2, sigma2 = (v.double() for v in (mu1, sigma1, mu2, sigma2))
    root = _sqrtm_psd(sigma1)
    inner = root @ sigma2 @ root
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean
    return value.clamp_min(0)


def mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean ``(F,)`` and unbiased covariance ``(F, F)`` of ``x (N, F)`` (N >= 2)."""
    x = x.double()
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / (x.shape[0] - 1)


def polynomial_kernel(a: Tensor, b: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """``(a b^T / F + coef) ** degree`` for ``a (N, F)``, ``b (M, F)``."""
    return (a @ b.T / a.shape[1] + coef) ** degree


def mmd2_unbiased(a: Tensor, b: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """The unbiased squared MMD between ``a (m, F)`` and ``b (n, F)`` under `polynomial_kernel` (m, n >= 2)."""
    m, n = a.shape[0], b.shape[0]
    k_aa = polynomial_kernel(a, a, degree, coef)
    k_bb = polynomial_kernel(b, b, degree, coef)
    k_ab = polynomial_kernel(a, b, degree, coef)
    return ((k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1)) + (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
            - 2 * k_ab.mean())


def knn_radii(x: Tensor, k: int, chunk: int = 4096) -> Tensor:
    """Distance of each row of ``x (N, F)`` to its `k`-th nearest other row ``(N,)``."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (distance 0)
    return torch.cat(out)


def coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 4096) -> Tensor:
    """Fraction of ``points (N, F)`` inside at least one ball ``(centres (M, F), radii (M,))``."""
    inside = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside).double().mean()


# --------------------------------------------------------------------------- metrics
class _FeatureMetric(Metric):
    """Accumulates extractor features of reference and generated examples (list states, concatenated across ranks)."""

    higher_is_better = False
    result_names: tuple[str, ...] = ()  # one number
    full_state_update = False

    def __init__(self, extractor: FeatureExtractor, **kwargs):
        super().__init__(**kwargs)
        self.extractor = extractor
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def update(self, samples: Tensor, real: bool) -> None:
        if samples.shape[0] == 0:
            return
        (self.real_features if real else self.fake_features).append(self.extractor(samples))

    def _features(self, min_count: int = 2) -> tuple[Tensor, Tensor]:
        def cat(v):  # a list before synchronisation, one concatenated tensor after it
            if isinstance(v, list):
                return torch.cat(v).double() if v else torch.empty(0, 0, dtype=torch.float64)
            return v.double()

        real, fake = cat(self.real_features), cat(self.fake_features)
        if min(len(real), len(fake)) < min_count:
            raise ValueError(f"{type(self).__name__} needs at least {min_count} reference and generated samples, "
                             f"got {len(real)} and {len(fake)}")
        return real, fake


class FrechetDistance(_FeatureMetric):
    """Frechet distance between Gaussians fitted to reference and generated features (see the module docstring)."""

    def compute(self) -> Tensor:
        real, fake = self._features()
        return frechet_distance(*mean_cov(real), *mean_cov(fake))


@attrs.define
class KIDConfig(FeatureConfig):
    subsets: int = 100
    subset_size: int = 1000
    degree: int = 3
    coef: float = 1.0
    subset_seed: int = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.subsets < 1 or self.subset_size < 2:
            raise ConfigError(f"expected subsets >= 1 and subset_size >= 2, got {self.subsets}, {self.subset_size}",
                              ("subset_size",))


KIDConfig.__doc__ = ("Options of kid (kernel distance).\n\n    Attributes:" + FEATURE_OPTIONS_DOC + """
        subsets: number of random subsets the estimate is averaged over (1 when both sets fit in one).
        subset_size: examples of each set per subset.
        degree: degree of the polynomial kernel (a.b / F + coef) ** degree.
        coef: constant of the polynomial kernel.
        subset_seed: seed of the subset draws.""")


class KernelDistance(_FeatureMetric):
    """KID: unbiased squared MMD with a cubic polynomial kernel (see the module docstring)."""

    def __init__(self, extractor: FeatureExtractor, config: KIDConfig | None = None, **kwargs):
        super().__init__(extractor, **kwargs)
        self.config = config or KIDConfig(feature_extractor="raw")

    def compute(self) -> Tensor:
        real, fake = self._features()
        c = self.config
        if max(len(real), len(fake)) <= c.subset_size:
            return mmd2_unbiased(real, fake, c.degree, c.coef)
        size = min(c.subset_size, len(real), len(fake))
        g = torch.Generator().manual_seed(c.subset_seed)
        values = [mmd2_unbiased(real[torch.randperm(len(real), generator=g)[:size]],
                                fake[torch.randperm(len(fake), generator=g)[:size]], c.degree, c.coef)
                  for _ in range(c.subsets)]
        return torch.stack(values).mean()


@attrs.define
class PrecisionRecallConfig(FeatureConfig):
    k: int = 3

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.k < 1:
            raise ConfigError(f"expected a positive integer, got {self.k}", ("k",))


PrecisionRecallConfig.__doc__ = ("Options of precision_recall.\n\n    Attributes:" + FEATURE_OPTIONS_DOC + """
        k: the k of the k-nearest-neighbour balls (Kynkaanniemi et al. use 3).""")


class PrecisionRecall(_FeatureMetric):
    """Improved precision and recall (k-NN manifolds in feature space); ``compute()`` -> {"precision", "recall"}."""

    higher_is_better = True
    result_names = ("precision", "recall")

    def __init__(self, extractor: FeatureExtractor, k: int = 3, **kwargs):
        super().__init__(extractor, **kwargs)
        self.k = k

    def compute(self) -> dict[str, Tensor]:
        real, fake = self._features(min_count=self.k + 1)
        precision = coverage(fake, real, knn_radii(real, self.k))
        recall = coverage(real, fake, knn_radii(fake, self.k))
        return {"precision": precision, "recall": recall}


# --------------------------------------------------------------------------- factories
def make_frechet_distance(config: FeatureConfig, spec: DataSpec, data: DataSource | None = None) -> FrechetDistance:
    """Metric factory for ``plugin = "frechet_distance"``."""
    return FrechetDistance(build_extractor(config, spec, data))


def make_kid(config: KIDConfig, spec: DataSpec, data: DataSource | None = None) -> KernelDistance:
    """Metric factory for ``plugin = "kid"``."""
    return KernelDistance(build_extractor(config, spec, data), config)


def make_precision_recall(config: PrecisionRecallConfig, spec: DataSpec,
                          data: DataSource | None = None) -> PrecisionRecall:
    """Metric factory for ``plugin = "precision_recall"``."""
    return PrecisionRecall(build_extractor(config, spec, data), config.k)
