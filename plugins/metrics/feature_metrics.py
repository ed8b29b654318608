"""Feature-space sample metrics: Frechet distance, kernel distance (KID), precision and recall.

Each is a ``torchmetrics.Metric`` following ``core.interfaces.SampleMetric``:
``update(samples, real)`` maps a batch ``(B, ...)`` to features ``(B, F)``
with the metric's feature extractor (`plugins.metrics.features`). Generated
features are appended to a list state; each reference batch is reduced to the
metric's reference statistics (the Frechet distance's count, mean and
covariance; the features themselves for KID and precision/recall), read from
and written to the on-disk cache of `plugins.metrics.refcache` when the
extractor has an identity. Every state is a list (``dist_reduce_fx="cat"``),
so under several processes every rank contributes exactly its own examples;
``compute()`` sees all of them. The Frechet distance pools the per-batch
statistics exactly (Chan et al.'s parallel update)::

    N = sum_i n_i,   mu = sum_i n_i mu_i / N,
    S = (sum_i (n_i - 1) S_i + sum_i n_i (mu_i - mu)(mu_i - mu)^T) / (N - 1)

which for a single batch is that batch's mean and covariance.

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

from pathlib import Path
from typing import Any

from core.interfaces import DataSource, DataSpec
from registry import ConfigError

from .features import FEATURE_OPTIONS_DOC, FeatureConfig, build_extractor, default_cache_dir
from .refcache import ReferenceCache, cache_key, fingerprint


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


def pooled_mean_cov(counts: Tensor, means: Tensor, covs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of the union of batches with ``counts (k,)``,
    ``means (k, F)`` and unbiased covariances ``covs (k, F, F)`` (see the module docstring)."""
    if len(counts) == 1:
        return means[0], covs[0]
    n = counts.sum()
    mu = (counts[:, None] * means).sum(0) / n
    d = means - mu
    scatter = ((counts - 1)[:, None, None] * covs).sum(0) + (counts[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
    return mu, scatter / (n - 1)


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
def _cat(value: Any) -> Tensor | None:
    """A list state before synchronisation, one concatenated tensor after it; None when empty."""
    if isinstance(value, list):
        return torch.cat(value).double() if value else None
    return value.double()


class _FeatureMetric(Metric):
    """Features of generated examples and statistics of reference examples (list states, concatenated
    across ranks); `reference_names` and `reference_statistics` are what a subclass keeps of the reference."""

    higher_is_better = False
    result_names: tuple[str, ...] = ()  # one number
    full_state_update = False
    #: the reference statistics kept (states ``real_<name>``) and the name they are cached under
    reference_names: tuple[str, ...] = ("features",)
    statistic = "features"

    def __init__(self, extractor: Any, cache: ReferenceCache | None = None, **kwargs):
        super().__init__(**kwargs)
        self.extractor, self.cache = extractor, cache
        #: how many reference batches went through the extractor (the others came from the cache)
        self.reference_extractions = 0
        for name in self.reference_names:
            self.add_state(f"real_{name}", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def reference_statistics(self, features: Tensor) -> dict[str, Tensor]:
        """What is kept of a reference batch's features ``(B, F)``: by default the features."""
        return {"features": features}

    def update(self, samples: Tensor, real: bool) -> None:
        if samples.shape[0] == 0:
            return
        if not real:
            self.fake_features.append(self.extractor(samples).double())
            return
        key = self.reference_key(samples)
        if key is None or not self.add_cached_reference(key):
            self.reference_extractions += 1
            self.add_reference_features(self.extractor(samples).double(), key)

    def reference_key(self, samples: Any) -> str | None:
        """The cache key of reference examples `samples` (a tensor or an array); None without a cache or an
        extractor identity."""
        identity = getattr(self.extractor, "identity", None)
        if self.cache is None or identity is None:
            return None
        return cache_key(fingerprint(samples), identity, self.statistic)

    def add_cached_reference(self, key: str) -> bool:
        """Add the reference statistics cached under `key`; False when there are none."""
        stats = self.cache.load(key) if self.cache is not None else None
        if stats is None or set(stats) != set(self.reference_names):
            return False
        for name in self.reference_names:
            getattr(self, f"real_{name}").append(stats[name])
        return True

    def add_reference_features(self, features: Tensor, key: str | None = None) -> None:
        """Add the statistics of reference features ``(B, F)``, caching them under `key` when given."""
        self._update_count += 1  # torchmetrics' count of updates: features fed directly count as one
        stats = self.reference_statistics(features.double())
        if key is not None and self.cache is not None:
            self.cache.save(key, stats, {"statistic": self.statistic,
                                         "extractor": getattr(self.extractor, "identity", None)})
        for name in self.reference_names:
            getattr(self, f"real_{name}").append(stats[name])

    def add_generated_features(self, features: Tensor) -> None:
        """Add features ``(B, F)`` of generated examples (already extracted)."""
        self._update_count += 1
        self.fake_features.append(features.double())

    def _fake(self, min_count: int) -> Tensor:
        """The generated features ``(N, F)``; ValueError when fewer than `min_count`."""
        return self._at_least(self.fake_features, min_count, "generated")

    def _real_features(self, min_count: int) -> Tensor:
        """The reference features ``(N, F)``; ValueError when fewer than `min_count`."""
        return self._at_least(self.real_features, min_count, "reference")

    def _at_least(self, parts: list[Tensor], min_count: int, which: str) -> Tensor:
        features = _cat(parts)
        count = 0 if features is None else len(features)
        if count < min_count:
            raise ValueError(f"{type(self).__name__} needs at least {min_count} reference and generated samples, "
                             f"got {count} {which}")
        return features


class FrechetDistance(_FeatureMetric):
    """Frechet distance between Gaussians fitted to reference and generated features (see the module docstring)."""

    reference_names = ("count", "mean", "cov")
    statistic = "frechet_mean_cov"

    def reference_statistics(self, features: Tensor) -> dict[str, Tensor]:
        n = features.shape[0]
        mu, cov = mean_cov(features) if n > 1 else (features[0], torch.zeros(features.shape[1], features.shape[1],
                                                                            dtype=torch.float64))
        return {"count": torch.tensor([float(n)], dtype=torch.float64), "mean": mu[None], "cov": cov[None]}

    def compute(self) -> Tensor:
        counts = _cat(self.real_count)
        if counts is None or counts.sum() < 2:
            raise ValueError(f"FrechetDistance needs at least 2 reference and generated samples, got "
                             f"{0 if counts is None else int(counts.sum())} reference")
        fake = self._fake(2)
        mu, cov = pooled_mean_cov(counts, _cat(self.real_mean), _cat(self.real_cov))
        return frechet_distance(mu, cov, *mean_cov(fake))

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

    def __init__(self, extractor: Any, config: KIDConfig | None = None, cache: ReferenceCache | None = None, **kwargs):
        super().__init__(extractor, cache, **kwargs)
        self.config = config or KIDConfig(feature_extractor="raw")

    def compute(self) -> Tensor:
        real, fake = self._real_features(2), self._fake(2)
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

    def __init__(self, extractor: Any, k: int = 3, cache: ReferenceCache | None = None, **kwargs):
        super().__init__(extractor, cache, **kwargs)
        self.k = k

    def compute(self) -> dict[str, Tensor]:
        real, fake = self._real_features(self.k + 1), self._fake(self.k + 1)
        precision = coverage(fake, real, knn_radii(real, self.k))
        recall = coverage(real, fake, knn_radii(fake, self.k))
        return {"precision": precision, "recall": recall}


# --------------------------------------------------------------------------- factories
def reference_cache(config: FeatureConfig) -> ReferenceCache | None:
    """The reference-statistics cache `config` asks for: under ``cache_dir`` (default `default_cache_dir`)."""
    if not config.cache_reference:
        return None
    return ReferenceCache(Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir())


def make_frechet_distance(config: FeatureConfig, spec: DataSpec, data: DataSource | None = None,
                          feature_extractor: Any = None) -> FrechetDistance:
    """Metric factory for ``plugin = "frechet_distance"`` (`feature_extractor`: the experiment's section)."""
    return FrechetDistance(build_extractor(config, spec, data, feature_extractor), reference_cache(config))


def make_kid(config: KIDConfig, spec: DataSpec, data: DataSource | None = None,
             feature_extractor: Any = None) -> KernelDistance:
    """Metric factory for ``plugin = "kid"``."""
    return KernelDistance(build_extractor(config, spec, data, feature_extractor), config, reference_cache(config))


def make_precision_recall(config: PrecisionRecallConfig, spec: DataSpec, data: DataSource | None = None,
                          feature_extractor: Any = None) -> PrecisionRecall:
    """Metric factory for ``plugin = "precision_recall"``."""
    return PrecisionRecall(build_extractor(config, spec, data, feature_extractor), config.k, reference_cache(config))
