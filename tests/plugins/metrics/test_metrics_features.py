"""Feature-space metrics: Frechet distance, KID, precision/recall, and the cached feature network."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch

import registry
from core.interfaces import DataSpec, SampleMetric
from plugins.data.digits import Digits, DigitsConfig
from plugins.metrics import features, trained
from plugins.metrics.feature_metrics import (FrechetDistance, KernelDistance, KIDConfig, PrecisionRecall,
                                             frechet_distance, mmd2_unbiased)
from plugins.metrics.features import FeatureConfig, FeatureExtractor
from registry import ConfigError


def raw(dim: int) -> FeatureExtractor:
    return FeatureExtractor(None, DataSpec(shape=(dim,)), "raw")


def gaussian(n: int, mu: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mu + torch.randn(n, len(mu), generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T


def random_cov(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def closed_form_fd(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) with scipy's general matrix square root."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean.real))


# --------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_of_a_sample_with_itself_is_zero():
    x = gaussian(500, torch.zeros(6, dtype=torch.float64), random_cov(6, 0), seed=1)
    metric = FrechetDistance(raw(6))
    metric.update(x, real=True)
    metric.update(x, real=False)
    assert abs(float(metric.compute())) < 1e-9


def test_frechet_distance_formula_matches_the_closed_form():
    d = 5
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.linspace(-1, 1, d, dtype=torch.float64)
    s1, s2 = random_cov(d, 1), random_cov(d, 2)
    assert float(frechet_distance(mu1, s1, mu2, s2)) == pytest.approx(closed_form_fd(mu1, s1, mu2, s2), rel=1e-8)
    # diagonal covariances: sum of squared mean differences plus squared differences of standard deviations
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    expected = float((mu2[:3] ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert float(frechet_distance(mu1[:3], torch.diag(a), mu2[:3], torch.diag(b))) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_two_gaussian_samples_approaches_the_closed_form():
    d = 4
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    s1, s2 = random_cov(d, 3), random_cov(d, 4)
    metric = FrechetDistance(raw(d))
    for k in range(4):  # several batches, like the evaluation loop
        metric.update(gaussian(10_000, mu1, s1, seed=10 + k), real=True)
        metric.update(gaussian(10_000, mu2, s2, seed=20 + k), real=False)
    expected = closed_form_fd(mu1, s1, mu2, s2)
    assert float(metric.compute()) == pytest.approx(expected, rel=0.03)


# --------------------------------------------------------------------------- KID
def test_kid_is_unbiased_on_two_samples_of_one_distribution():
    d, n, draws = 4, 40, 300
    mu, cov = torch.zeros(d, dtype=torch.float64), random_cov(d, 5)
    values = torch.stack([mmd2_unbiased(gaussian(n, mu, cov, 2 * i), gaussian(n, mu, cov, 2 * i + 1))
                          for i in range(draws)])
    stderr = float(values.std() / math.sqrt(draws))
    assert abs(float(values.mean())) < 3 * stderr, (float(values.mean()), stderr)
    # the biased V-statistic (diagonal kept) is visibly positive at this size: the test can tell them apart
    x, y = gaussian(n, mu, cov, 1000), gaussian(n, mu, cov, 1001)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    biased = float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    assert biased > 10 * stderr


def test_kid_metric_subsets_and_separation():
    d = 3
    mu, cov = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    same = KernelDistance(raw(d), KIDConfig(feature_extractor="raw", subsets=20, subset_size=100))
    shifted = KernelDistance(raw(d), KIDConfig(feature_extractor="raw", subsets=20, subset_size=100))
    real = gaussian(400, mu, cov, 0)
    for metric, fake in ((same, gaussian(400, mu, cov, 1)), (shifted, gaussian(400, mu + 1.0, cov, 2))):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    assert abs(float(same.compute())) < 0.05
    assert float(shifted.compute()) > 0.5


# --------------------------------------------------------------------------- precision / recall
def test_precision_recall_detects_mode_collapse():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    real = centres[torch.randint(4, (800,), generator=g)] + 0.5 * torch.randn(800, 2, generator=g)
    good = centres[torch.randint(4, (800,), generator=g)] + 0.5 * torch.randn(800, 2, generator=g)
    collapsed = centres[0] + 0.5 * torch.randn(800, 2, generator=g)
    results = {}
    for name, fake in (("good", good), ("collapsed", collapsed)):
        metric = PrecisionRecall(raw(2), k=3)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        results[name] = {k: float(v) for k, v in metric.compute().items()}
    assert results["good"]["precision"] > 0.9 and results["good"]["recall"] > 0.9
    assert results["collapsed"]["precision"] > 0.9 and results["collapsed"]["recall"] < 0.35
    assert PrecisionRecall.higher_is_better


def test_registered_metrics_follow_the_sample_metric_protocol():
    spec = DataSpec(shape=(2,))
    for name in ("frechet_distance", "kid", "precision_recall"):
        assert name in registry.available("metric")
        metric = registry.build("metric", {"plugin": name, "feature_extractor": "raw"}, spec=spec, data=None)
        assert isinstance(metric, SampleMetric)


# --------------------------------------------------------------------------- the trained feature network
TINY = {"train_steps": 5, "train_batch_size": 32, "feature_dim": 16}


def test_trained_feature_network_is_cached_and_reused(tmp_path, monkeypatch):
    data = Digits(DigitsConfig())
    config = FeatureConfig(cache_dir=str(tmp_path), **TINY)
    trained.clear_memory_cache()
    first = features.build_extractor(config, data.spec, data)
    files = list((tmp_path / "features").glob("*.pt"))
    assert len(files) == 1
    x = data.reference(20, torch.Generator().manual_seed(0))["x"]
    out = first(x)
    assert out.shape == (20, 16) and out.dtype == torch.float64
    chunked = FeatureExtractor(first.body, data.spec, "trained", batch_size=7)(x)
    torch.testing.assert_close(chunked, out, rtol=1e-5, atol=1e-6)  # float32 network, batch-dependent kernels

    def no_training(*args, **kwargs):
        raise AssertionError("the cached feature network was retrained")

    monkeypatch.setattr(trained, "train_feature_net", no_training)
    trained.clear_memory_cache()  # force a load from disk
    again = features.build_extractor(config, data.spec, data)
    torch.testing.assert_close(again(x), out)
    # the discrete form of the same digits sees the same data, so it shares the network
    discrete = Digits(DigitsConfig(form="discrete"))
    shared = features.build_extractor(config, discrete.spec, discrete)
    torch.testing.assert_close(shared(discrete.reference(20, torch.Generator().manual_seed(0))["x"]), out)
    if "with_mask_token" in registry.available("data"):  # a mask token added to the vocabulary changes nothing
        masked = registry.build("data", {"plugin": "with_mask_token", "data": {"plugin": "digits", "form": "discrete"}})
        shared = features.build_extractor(config, masked.spec, masked)
        torch.testing.assert_close(shared(masked.reference(20, torch.Generator().manual_seed(0))["x"]), out)
    assert len(list((tmp_path / "features").glob("*.pt"))) == 1
    # another seed is another network
    monkeypatch.undo()
    features.build_extractor(FeatureConfig(cache_dir=str(tmp_path), feature_seed=1, **TINY), data.spec, data)
    assert len(list((tmp_path / "features").glob("*.pt"))) == 2


def test_corrupt_feature_cache_is_rebuilt_with_a_warning(tmp_path):
    data = Digits(DigitsConfig(conditional=False))  # unlabelled: an autoencoder
    config = FeatureConfig(cache_dir=str(tmp_path), **TINY)
    trained.clear_memory_cache()
    net, file = trained.cached_feature_net(data, config)
    assert net.num_classes == 0
    x = data.reference(8, torch.Generator().manual_seed(0))["x"]
    expected = net.encoder(x)
    file.write_bytes(b"this is not a checkpoint")
    trained.clear_memory_cache()
    with pytest.warns(RuntimeWarning, match="unusable.*retraining"):
        rebuilt, same_file = trained.cached_feature_net(data, config)
    assert same_file == file
    torch.testing.assert_close(rebuilt.encoder(x), expected)  # deterministic training: the same network
    trained.clear_memory_cache()
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert state["meta"]["key"] == file.stem


def test_feature_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWFORGE_CACHE", str(tmp_path / "ff"))
    assert features.default_cache_dir() == tmp_path / "ff"
    monkeypatch.delenv("FLOWFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert features.default_cache_dir() == tmp_path / "xdg" / "flowforge"


def test_inception_without_local_weights_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    spec = Digits(DigitsConfig()).spec
    with pytest.raises(ConfigError, match="InceptionV3 weights.*never downloads"):
        registry.build("metric", {"plugin": "frechet_distance", "feature_extractor": "inception"}, spec=spec)
    with pytest.raises(ConfigError, match="not found"):
        registry.build("metric", {"plugin": "kid", "feature_extractor": "inception",
                                  "weights": str(tmp_path / "missing.pth")}, spec=spec)
    with pytest.raises(ConfigError, match="images"):
        registry.build("metric", {"plugin": "frechet_distance", "feature_extractor": "inception"},
                       spec=DataSpec(shape=(2,)))


# --------------------------------------------------------------------------- several processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, real: torch.Tensor, fake: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # uneven shares, as core.generate splits counts: no rank pads its share
        cut_r, cut_f = 7, 5
        mine_r = real[:cut_r] if rank == 0 else real[cut_r:]
        mine_f = fake[:cut_f] if rank == 0 else fake[cut_f:]
        values = {}
        for name, metric in (("fd", FrechetDistance(raw(3))),
                             ("kid", KernelDistance(raw(3), KIDConfig(feature_extractor="raw"))),
                             ("pr", PrecisionRecall(raw(3), k=2))):
            metric.update(mine_r, real=True)
            metric.update(mine_f, real=False)
            v = metric.compute()
            values[name] = {k: float(x) for k, x in v.items()} if isinstance(v, dict) else float(v)
        if rank == 0:
            torch.save(values, out)
    finally:
        dist.destroy_process_group()


def test_metrics_gather_every_rank_without_padding(tmp_path):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64) + 0.3
    out = tmp_path / "values.pt"
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), real, fake, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    single = {}
    for name, metric in (("fd", FrechetDistance(raw(3))), ("kid", KernelDistance(raw(3), KIDConfig(feature_extractor="raw"))),
                         ("pr", PrecisionRecall(raw(3), k=2))):
        metric.update(real, real=True)
        metric.update(fake, real=False)
        v = metric.compute()
        single[name] = {k: float(x) for k, x in v.items()} if isinstance(v, dict) else float(v)
    assert got["fd"] == pytest.approx(single["fd"], rel=1e-9)
    assert got["kid"] == pytest.approx(single["kid"], rel=1e-9)
    assert got["pr"] == pytest.approx(single["pr"], rel=1e-9)
