"""Feature extractors are a component kind; feature metrics name theirs; reference statistics are cached.

* A third-party extractor (a temporary plugin) is used by a Frechet distance, in a metric built through
  the registry and as the ``[feature_extractor]`` section of a real (tiny) run; the value equals the
  Frechet distance of its features computed here in float64 with scipy's sqrtm.
* The older options (``feature_extractor = "trained"`` and the training options) build the same network
  as ``features = {plugin = "digits_cnn", ...}``: identical features, identical cache key.
* An unknown extractor is a did-you-mean ConfigError, exit status 2 from the command line.
* InceptionV3 from a local file of random weights saved here: (B, 2048) pool features, the file must
  match the architecture, grey images equal their three-channel copies.
* The reference cache: a second evaluation reads it (equal results, the extractor not run on the
  reference again), another reference selection misses; statistics pooled over batches are exact.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.interfaces import DataSpec
from plugins.metrics import trained
from plugins.metrics.feature_metrics import FrechetDistance, KernelDistance, KIDConfig, mean_cov, pooled_mean_cov
from plugins.metrics.features import FeatureConfig, build_extractor
from plugins.metrics.inception import FIDInceptionV3
from plugins.metrics.refcache import ReferenceCache
from registry import ConfigError, hookimpl

from ...conftest import RF2D, TINY_RF2D
from ...e2e.test_bad_inputs import run_in_process


# --------------------------------------------------------------------------- a third-party extractor
@attrs.define
class MomentsConfig:
    scale: float = 1.0


class Moments:
    """Features ``[scale * mean, std, max]`` of each flattened example; counts its calls."""

    calls = 0

    def __init__(self, config: MomentsConfig, spec: DataSpec):
        self.scale = config.scale
        self.identity = {"plugin": "moments", "scale": config.scale, "shape": list(spec.shape)}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        Moments.calls += 1
        flat = x.reshape(x.shape[0], -1).double()
        return torch.stack([self.scale * flat.mean(1), flat.std(1), flat.max(1).values], 1)


class MomentsPlugin:
    @hookimpl
    def flowforge_register(self, register):
        register("feature_extractor", "moments", Moments, MomentsConfig, doc="mean, std and max of each example")


@pytest.fixture
def moments():
    with registry.temporary_plugin(MomentsPlugin(), name="flowforge_moments", distribution="flowforge-moments"):
        Moments.calls = 0
        yield


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID in float64 with scipy's general matrix square root (pytorch-fid's formula)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def two_sets(n: int = 300, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), 0.8 * torch.randn(n, dim, generator=g) + 0.3


def test_a_third_party_extractor_serves_a_frechet_distance(moments, tmp_path):
    spec = DataSpec(shape=(6,))
    real, fake = two_sets()
    metric = registry.build("metric", {"plugin": "frechet_distance", "features": {"plugin": "moments", "scale": 2.0},
                                       "cache_dir": str(tmp_path)}, spec=spec)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ext = Moments(MomentsConfig(2.0), spec)
    expected = scipy_fid(ext(real).numpy(), ext(fake).numpy())
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-8)


def test_the_feature_extractor_section_is_the_runs_default(moments, tmp_path):
    """A run whose [feature_extractor] is the third-party one; evaluating it again reads the reference
    statistics from the cache (same numbers, no extraction of the reference), another seed misses."""
    import tomllib

    from core.generate import evaluate
    from core.run import run
    from core.runs import load_run

    out = tmp_path / "run"
    run(RF2D, [*TINY_RF2D, "trainer.steps=2", "eval.num_pictures=0", "eval.untrained=false",
               "feature_extractor={plugin='moments', scale=3.0}",
               f"metrics=[{{plugin='frechet_distance', cache_dir='{tmp_path / 'cache'}'}}]"], out=out)
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["feature_extractor"] == {"plugin": "moments", "scale": 3.0}
    assert Moments.calls > 0  # the metric used the section's extractor
    loaded = load_run(out, device="cpu")
    metric = loaded.components.metrics["frechet_distance"]
    assert isinstance(metric.extractor, Moments) and metric.extractor.scale == 3.0
    first = evaluate(loaded.components, loaded.model, 200, seed=11, batch_size=64)
    second = evaluate(loaded.components, loaded.model, 200, seed=11, batch_size=64)
    assert first == second and metric.reference_extractions == 1  # the second read the cache
    evaluate(loaded.components, loaded.model, 200, seed=12, batch_size=64)
    assert metric.reference_extractions == 2  # another global reference selection: another fingerprint


def test_unknown_extractor_is_a_did_you_mean_exit_2(tmp_path):
    status, stderr = run_in_process([str(RF2D), "--out", str(tmp_path / "r"), "--set",
                                     "metrics=[{plugin='frechet_distance', features='pixel'}]"])
    assert status == 2, stderr
    assert "unknown feature_extractor plugin 'pixel'" in stderr and 'did you mean "pixels"' in stderr
    assert "metrics[0].features" in stderr and "Traceback" not in stderr


def test_features_and_the_older_options_do_not_mix():
    spec = DataSpec(shape=(2,))
    with pytest.raises(ConfigError, match="older form of features"):
        registry.build("metric", {"plugin": "kid", "features": "pixels", "feature_extractor": "inception"}, spec=spec)
    with pytest.raises(ConfigError, match="older form of features"):
        registry.build("metric", {"plugin": "kid", "features": "pixels", "weights": "w.pth"}, spec=spec)
    with pytest.raises(ConfigError, match="needs a plugin key"):
        registry.build("metric", {"plugin": "kid", "features": {"weights": "x"}}, spec=spec)
    with pytest.raises(ConfigError, match=r'features.feature_dims: unknown key \(did you mean "feature_dim"'):
        registry.resolved("metric", {"plugin": "kid", "features": {"plugin": "digits_cnn", "feature_dims": 3}})


def test_features_resolve_with_their_defaults_and_smoke_caps_them():
    from core import config
    from core.smoke import apply_smoke

    raw = config.apply_overrides(config.read_toml(str(RF2D)), [
        "metrics=[{plugin='kid', features='digits_cnn'}]", "feature_extractor={plugin='digits_cnn'}"])
    exp = config.resolve(raw)
    assert exp.metrics[0]["features"] == {"plugin": "digits_cnn", "feature_dim": 128, "train_steps": 1000,
                                          "train_batch_size": 128, "train_lr": 1e-3, "feature_seed": 0,
                                          "cache_dir": ""}
    smoke = config.resolve(apply_smoke(raw))
    assert smoke.metrics[0]["features"]["train_steps"] == 50 and smoke.metrics[0]["subset_size"] == 100


TINY = {"train_steps": 5, "train_batch_size": 32, "feature_dim": 16}


def test_older_options_build_the_same_digits_network(tmp_path):
    from plugins.data.digits import Digits, DigitsConfig

    data = Digits(DigitsConfig())
    trained.clear_memory_cache()
    old = build_extractor(FeatureConfig(cache_dir=str(tmp_path), **TINY), data.spec, data)
    new = build_extractor(FeatureConfig(features={"plugin": "digits_cnn", "cache_dir": str(tmp_path), **TINY}),
                          data.spec, data)
    assert old.identity == new.identity and old.name == new.name == "digits_cnn"
    x = data.reference(16, torch.Generator().manual_seed(0))["x"]
    torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    assert len(list((tmp_path / "features").glob("*.pt"))) == 1


# --------------------------------------------------------------------------- inception
def random_inception(path, seed: int = 0):
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    torch.save(net.state_dict(), path)
    return path


def test_inception_from_a_local_file(tmp_path):
    spec = DataSpec(shape=(3, 16, 16))
    weights = random_inception(tmp_path / "w.pth")
    ext = registry.build("feature_extractor", {"plugin": "inception", "weights": str(weights), "resize": 75},
                         spec=spec)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    f = ext(x)
    assert f.shape == (3, 2048) and f.dtype == torch.float64 and bool((f >= 0).all())  # means of ReLU outputs
    torch.testing.assert_close(ext(x[:1]), f[:1], rtol=1e-4, atol=1e-6)  # per-example
    grey = registry.build("feature_extractor", {"plugin": "inception", "weights": str(weights), "resize": 75},
                          spec=DataSpec(shape=(1, 16, 16)))
    torch.testing.assert_close(grey(x[:, :1]), ext(x[:, :1].repeat(1, 3, 1, 1)))
    other = registry.build("feature_extractor", {"plugin": "inception", "weights": str(random_inception(
        tmp_path / "w2.pth", seed=1)), "resize": 75}, spec=spec)
    assert other.identity != ext.identity  # the weights hash keys the reference cache


def test_inception_refuses_a_file_of_another_network(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="not pytorch-fid's InceptionV3"):
        registry.build("feature_extractor", {"plugin": "inception", "weights": str(tmp_path / "bad.pth")},
                       spec=DataSpec(shape=(3, 8, 8)))


# --------------------------------------------------------------------------- the reference cache
def test_second_evaluation_reads_the_reference_cache(moments, tmp_path):
    spec = DataSpec(shape=(6,))
    real, fake = two_sets(seed=1)
    mapping = {"features": "moments", "cache_dir": str(tmp_path)}
    results = []
    for attempt in range(2):
        fd = registry.build("metric", {"plugin": "frechet_distance", **mapping}, spec=spec)
        kid = registry.build("metric", {"plugin": "kid", "subset_size": 100, "subsets": 5, **mapping}, spec=spec)
        for m in (fd, kid):
            m.update(real, real=True)
            m.update(fake, real=False)
        results.append((float(fd.compute()), float(kid.compute())))
        assert (fd.reference_extractions, kid.reference_extractions) == ((1, 1) if attempt == 0 else (0, 0))
    assert results[0] == results[1]
    files = sorted((tmp_path / "reference").glob("*.safetensors"))
    assert len(files) == 2  # one per statistic: the Frechet mean and covariance, KID's features
    from safetensors.torch import load_file

    stats = {k for f in files for k in load_file(str(f))}
    assert stats == {"count", "mean", "cov", "features"}
    # another reference selection (the same examples in another order) is another fingerprint: a miss
    again = registry.build("metric", {"plugin": "frechet_distance", **mapping}, spec=spec)
    again.update(real.flip(0), real=True)
    assert again.reference_extractions == 1


def test_an_unreadable_cache_file_is_recomputed(tmp_path):
    cache = ReferenceCache(tmp_path)
    cache.file("k").parent.mkdir(parents=True)
    cache.file("k").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert cache.load("k") is None
    cache.save("k", {"a": torch.tensor([0.1], dtype=torch.float64)}, {})
    assert cache.load("k")["a"].item() == 0.1  # 0.1 is not a float32: stored in float64, exactly


def test_no_identity_no_cache(tmp_path):
    class Anonymous:
        def __call__(self, x):
            return x.double()

    metric = FrechetDistance(Anonymous(), ReferenceCache(tmp_path))
    metric.update(torch.randn(10, 2), real=True)
    assert not (tmp_path / "reference").exists()


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 59), max_size=4, unique=True))
def test_pooled_statistics_equal_those_of_the_union(cuts):
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(len(cuts)), dtype=torch.float64)
    edges = [0, *sorted(cuts), 60]
    parts = [x[a:b] for a, b in zip(edges, edges[1:])]
    metric = FrechetDistance(lambda v: v.double())
    stats = [metric.reference_statistics(p) for p in parts]
    mu, cov = pooled_mean_cov(torch.cat([s["count"] for s in stats]), torch.cat([s["mean"] for s in stats]),
                              torch.cat([s["cov"] for s in stats]))
    ref_mu, ref_cov = x.mean(0), torch.from_numpy(np.cov(x.numpy(), rowvar=False))
    torch.testing.assert_close(mu, ref_mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(cov, ref_cov, rtol=0, atol=1e-12)
    assert mean_cov(x)[1].shape == cov.shape


def test_kid_of_cached_features_equals_kid_without_a_cache(moments, tmp_path):
    spec = DataSpec(shape=(6,))
    real, fake = two_sets(seed=2)
    plain = KernelDistance(Moments(MomentsConfig(), spec), KIDConfig(subset_size=50, subsets=4))
    for m in (plain,):
        m.update(real, real=True)
        m.update(fake, real=False)
    values = []
    for _ in range(2):
        cached = KernelDistance(Moments(MomentsConfig(), spec), KIDConfig(subset_size=50, subsets=4),
                                ReferenceCache(tmp_path))
        cached.update(real, real=True)
        cached.update(fake, real=False)
        values.append(float(cached.compute()))
    assert values[0] == values[1] == float(plain.compute())


# --------------------------------------------------------------------------- the kind's conformance check
def test_every_extractor_passes_the_kind_check(moments, tmp_path):
    from plugins.data.digits import Digits, DigitsConfig
    from plugins.metrics.testing import check_feature_extractor

    data = Digits(DigitsConfig())
    weights = str(random_inception(tmp_path / "w.pth"))
    built = {
        "pixels": ({"plugin": "pixels"}, DataSpec(shape=(5,))),
        "digits_cnn": ({"plugin": "digits_cnn", "cache_dir": str(tmp_path), **TINY}, data.spec),
        "inception": ({"plugin": "inception", "weights": weights, "resize": 75}, DataSpec(shape=(3, 8, 8))),
        "moments": ({"plugin": "moments"}, DataSpec(shape=(4, 4))),
    }
    first_party = {n for n in registry.available("feature_extractor")
                   if registry.get("feature_extractor", n).distribution == "flowforge"}
    assert set(built) == first_party | {"moments"}  # every first-party one, and the third-party one
    for name, (mapping, spec) in built.items():
        check_feature_extractor(registry.build("feature_extractor", mapping, spec=spec, data=data), spec, n=3)


def test_the_kind_check_catches_batch_statistics():
    from plugins.metrics.testing import check_feature_extractor

    def normalised(x):  # features that depend on the rest of the batch
        flat = x.reshape(len(x), -1).double()
        return flat - flat.mean(0)

    with pytest.raises(AssertionError, match="alone"):
        check_feature_extractor(normalised, DataSpec(shape=(3,)))
