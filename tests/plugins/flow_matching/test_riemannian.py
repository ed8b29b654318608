"""Riemannian flow matching: manifolds, the geodesic path, the riemannian_ode solver and the vMF data.

Closed forms written here from the geometry (not from flowforge's code): the great-circle slerp
``x_s = (sin((1 - s) W) x_0 + sin(s W) x_1) / sin W`` with ``W = arccos <x_0, x_1>``; the torus's wrapped
line ``x_0 + s ((x_1 - x_0 + pi) mod 2 pi - pi)``; Rodrigues' rotation
``R(t) x = cos(w t) x + sin(w t) a x x + (1 - cos(w t)) <a, x> a`` of the field ``w a x x``; the vMF
cosine CDF ``F(c) = (e^{k c} - e^{-k}) / (e^k - e^{-k})`` and mean ``coth k - 1 / k`` on S^2.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.interfaces import DataSpec
from plugins.flow_matching.manifolds import Euclidean, FlatTorus, Manifold, Sphere

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None, database=None)
TWO_PI = 2 * math.pi


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.norm(dim=-1, keepdim=True)


def angles(n: int, d: int, seed: int) -> torch.Tensor:
    return TWO_PI * torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def slerp(x0, x1, s):
    w = torch.arccos((x0 * x1).sum(-1, keepdim=True).clamp(-1, 1))
    return (torch.sin((1 - s) * w) * x0 + torch.sin(s * w) * x1) / torch.sin(w)


def wrapped_line(x0, x1, s):
    d = torch.remainder(x1 - x0 + math.pi, TWO_PI) - math.pi
    return torch.remainder(x0 + s * d, TWO_PI)


def torus_close(a, b):
    """Largest coordinate distance on the circle (0 and 2 pi are the same point)."""
    d = torch.remainder(a - b + math.pi, TWO_PI) - math.pi
    return d.abs().max().item()


# --------------------------------------------------------------------------- manifolds
@SETTINGS
@given(seed=st.integers(0, 10_000), d=st.integers(2, 6), scale=st.floats(0.0, 3.0))
def test_sphere_exp_log_are_inverse(seed, d, scale):
    m = Sphere()
    x = unit(8, d, seed)
    u = m.proju(x, torch.randn(8, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64))
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12) * scale  # |u| < pi: log inverts exp
    y = m.expmap(x, u)
    assert (y.norm(dim=-1) - 1).abs().max() < 1e-12
    assert torch.allclose(m.logmap(x, y), u, atol=1e-9)
    assert torch.allclose(m.expmap(x, m.logmap(x, unit(8, d, seed + 2))), unit(8, d, seed + 2), atol=1e-10)
    assert (m.logmap(x, y) * x).sum(-1).abs().max() < 1e-12  # tangent at x


@SETTINGS
@given(seed=st.integers(0, 10_000), d=st.integers(1, 5))
def test_torus_exp_log_are_inverse(seed, d):
    m = FlatTorus()
    x = angles(8, d, seed)
    u = (torch.rand(8, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * 2 - 1) * 3.1
    y = m.expmap(x, u)
    assert bool(((y >= 0) & (y < TWO_PI)).all())
    assert torch.allclose(m.logmap(x, y), u, atol=1e-10)
    z = angles(8, d, seed + 2)
    assert torus_close(m.expmap(x, m.logmap(x, z)), z) < 1e-12


@pytest.mark.parametrize("manifold,points", [(Sphere(), unit), (FlatTorus(), angles),
                                             (Euclidean(), lambda n, d, s: unit(n, d, s) * 3)])
def test_geodesic_ends_and_constant_speed(manifold: Manifold, points):
    x0, x1 = points(16, 3, 0), points(16, 3, 1)
    if isinstance(manifold, Sphere):
        dist = torch.arccos((x0 * x1).sum(-1))
    elif isinstance(manifold, FlatTorus):
        dist = (torch.remainder(x1 - x0 + math.pi, TWO_PI) - math.pi).norm(dim=-1)
    else:
        dist = (x1 - x0).norm(dim=-1)
    assert torch.allclose(manifold.dist(x0, x1), dist, atol=1e-12)
    for s in (0.0, 0.3, 0.5, 0.9, 1.0):
        xs, v = manifold.geodesic(x0, x1, torch.full((16, 1), s, dtype=F64))
        assert torch.allclose(v.norm(dim=-1), dist, atol=1e-10), f"speed at s={s}"
        if s == 0.0:
            assert torch.allclose(xs, x0, atol=1e-14)
        if s == 1.0:
            assert (torus_close(xs, x1) if isinstance(manifold, FlatTorus) else (xs - x1).abs().max()) < 1e-12


@SETTINGS
@given(seed=st.integers(0, 10_000), s=st.floats(0.01, 0.99))
def test_sphere_geodesic_is_the_great_circle_slerp(seed, s):
    m = Sphere()
    x0, x1 = unit(8, 3, seed), unit(8, 3, seed + 1)
    st_ = torch.full((8, 1), s, dtype=F64)
    xs, v = m.geodesic(x0, x1, st_)
    assert torch.allclose(xs, slerp(x0, x1, st_), atol=1e-10)
    h = 1e-6
    fd = (slerp(x0, x1, st_ + h) - slerp(x0, x1, st_ - h)) / (2 * h)
    assert torch.allclose(v, fd, atol=1e-7)


@pytest.mark.parametrize("manifold,points", [(Sphere(), unit), (FlatTorus(), angles), (Euclidean(), unit)])
def test_closed_form_velocity_equals_the_autodiff_default(manifold, points):
    x0, x1 = points(32, 3, 0), points(32, 3, 1)
    s = torch.rand(32, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    xs, v = manifold.geodesic(x0, x1, s)
    xs_base, v_base = Manifold.geodesic(manifold, x0, x1, s)  # the JVP of exp_{x0}(s log_{x0} x1)
    assert torch.allclose(xs, xs_base, atol=1e-12) and torch.allclose(v, v_base, atol=1e-10)


def test_sphere_parallel_transport():
    """Isometric, into T_y, and carries the geodesic's velocity log_x y at x to its velocity -log_y x at y."""
    m = Sphere()
    x, y = unit(32, 4, 0), unit(32, 4, 1)
    v = m.proju(x, torch.randn(32, 4, generator=torch.Generator().manual_seed(2), dtype=F64))
    pv = m.transp(x, y, v)
    assert torch.allclose(pv.norm(dim=-1), v.norm(dim=-1), atol=1e-12)
    assert (pv * y).sum(-1).abs().max() < 1e-12
    assert torch.allclose(m.transp(x, y, m.logmap(x, y)), -m.logmap(y, x), atol=1e-10)


@SETTINGS
@given(seed=st.integers(0, 10_000), s=st.floats(0.0, 1.0))
def test_torus_geodesic_is_the_wrapped_line(seed, s):
    m = FlatTorus()
    x0, x1 = angles(8, 2, seed), angles(8, 2, seed + 1)
    st_ = torch.full((8, 1), s, dtype=F64)
    xs, v = m.geodesic(x0, x1, st_)
    assert torus_close(xs, wrapped_line(x0, x1, st_)) < 1e-12
    assert torch.allclose(v, m.logmap(x0, x1)) and torch.allclose(v.norm(dim=-1), m.dist(x0, x1))


# --------------------------------------------------------------------------- the geodesic path
def geodesic_path(manifold="sphere", scheduler="cond_ot", **ctx):
    return registry.build("path", {"plugin": "geodesic", "manifold": manifold},
                          scheduler=registry.build("scheduler", {"plugin": scheduler} if isinstance(scheduler, str)
                                                   else scheduler), **ctx)


@pytest.mark.parametrize("manifold,points", [("sphere", unit), ("torus", angles)])
@pytest.mark.parametrize("scheduler", ["cond_ot", {"plugin": "polynomial", "n": 2.0}])
def test_path_velocity_is_the_finite_difference(manifold, points, scheduler):
    path = geodesic_path(manifold, scheduler)
    x0, x1 = points(32, 3, 0), points(32, 3, 1)
    t = torch.rand(32, generator=torch.Generator().manual_seed(2), dtype=F64) * 0.9 + 0.05
    ps, h = path.sample(x0, x1, t), 1e-5
    fd = (path.sample(x0, x1, t + h).x_t - path.sample(x0, x1, t - h).x_t) / (2 * h)
    if manifold == "torus":
        fd = (torch.remainder(fd * 2 * h + math.pi, TWO_PI) - math.pi) / (2 * h)
    assert torch.allclose(ps.target, fd, atol=1e-7)
    if manifold == "sphere":
        assert (ps.x_t.norm(dim=-1) - 1).abs().max() < 1e-12
        assert (ps.x_t * ps.target).sum(-1).abs().max() < 1e-12  # tangent
    ends = path.sample(x0, x1, torch.cat([torch.zeros(16, dtype=F64), torch.ones(16, dtype=F64)]))
    assert torch.allclose(ends.x_t[:16], x0[:16], atol=1e-12)
    assert (torus_close if manifold == "torus" else lambda a, b: (a - b).abs().max())(ends.x_t[16:], x1[16:]) < 1e-10


def test_euclidean_geodesic_path_is_the_affine_path():
    sched = registry.build("scheduler", {"plugin": "polynomial", "n": 3.0})
    affine = registry.build("path", {"plugin": "affine"}, scheduler=sched)
    geo = registry.build("path", {"plugin": "geodesic", "manifold": "euclidean"}, scheduler=sched)
    g = torch.Generator().manual_seed(0)
    x0, x1, t = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64), torch.rand(
        8, generator=g, dtype=F64)
    a, b = affine.sample(x0, x1, t), geo.sample(x0, x1, t)
    assert torch.allclose(a.x_t, b.x_t, atol=1e-14) and torch.allclose(a.target, b.target, atol=1e-14)


def test_path_sources_are_uniform_on_the_manifold():
    g = torch.Generator().manual_seed(0)
    x = geodesic_path("sphere").sample_source((20000, 3), generator=g, dtype=F64)
    assert (x.norm(dim=-1) - 1).abs().max() < 1e-12
    assert torch.allclose(x.T @ x / len(x), torch.eye(3, dtype=F64) / 3, atol=0.01)  # E[x x^T] = I / 3
    assert x.mean(0).abs().max() < 0.02
    a = geodesic_path("torus").sample_source((20000, 2), generator=g)
    assert bool(((a >= 0) & (a < TWO_PI)).all()) and abs(a.mean().item() - math.pi) < 0.05
    again = geodesic_path("sphere").sample_source((4, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, geodesic_path("sphere").sample_source((4, 3), generator=torch.Generator().manual_seed(5)))


def test_objective_regresses_the_tangent_part_of_the_output():
    """A model whose output is the exact target plus a radial part has zero loss on the sphere."""
    path = geodesic_path("sphere")
    spec = DataSpec(shape=(3,), extra={"manifold": "sphere"})
    obj = registry.build("objective", {"plugin": "flow_matching"}, spec=spec, path=path)
    x1 = unit(64, 3, 4)
    torch.manual_seed(0)
    x0 = path.sample_source((64, 3))
    batch = {"x": x1, "x0": x0}

    def oracle(x, t, y=None):
        return path.sample(x0, x1, t).target + 5.0 * x  # 5 x is normal to the sphere at x

    loss, _ = obj.loss({"model": oracle}, batch, 0)
    assert loss.item() < 1e-12


# --------------------------------------------------------------------------- the solver
def solver(method="rk4", steps=20, path=None, **options):
    return registry.build("solver", {"plugin": "riemannian_ode", "method": method, "steps": steps, **options},
                          path=path or geodesic_path("sphere"))


def rotation(axis, omega):
    def field(x, t, y=None):
        return omega * torch.cross(axis.to(x.dtype).expand_as(x), x, dim=-1)
    return field


def rodrigues(x, axis, angle):
    a = axis.to(x.dtype)
    return (math.cos(angle) * x + math.sin(angle) * torch.cross(a.expand_as(x), x, dim=-1)
            + (1 - math.cos(angle)) * (x @ a)[:, None] * a)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_rotation_on_the_equator_is_exact(method):
    """The rotation w a x x is the geodesic flow on the great circle normal to a: exp steps are exact."""
    axis = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    phi = torch.linspace(0, TWO_PI, 9, dtype=F64)[:-1]
    x = torch.stack([torch.cos(phi), torch.sin(phi), torch.zeros_like(phi)], -1)
    out = solver(method, 3).sample(rotation(axis, 2.0), x)
    assert (out.x - rodrigues(x, axis, 2.0)).abs().max() < 1e-12


@pytest.mark.parametrize("retraction,rk4_order", [("exp", 3), ("projx", 4)])
def test_rotation_matches_rodrigues_and_converges(retraction, rk4_order):
    """Off the equator the orbits are small circles, not geodesics: the error against Rodrigues shrinks at each
    method's order. rk4 through exp maps and parallel transport is third order (transported stages are not a
    Lie-group RKMK correction); rk4 in the embedding with projection (Meta's step) keeps its fourth order."""
    axis = torch.tensor([1.0, 2.0, 2.0], dtype=F64) / 3
    x = unit(64, 3, 7)
    exact = rodrigues(x, axis, 1.5)
    errs = {m: [(solver(m, n, retraction=retraction).sample(rotation(axis, 1.5), x).x - exact).abs().max().item()
                for n in (16, 32)] for m in ("euler", "midpoint", "heun", "rk4")}
    assert errs["rk4"][1] < 1e-6, errs
    for m, order in (("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", rk4_order)):
        assert 0.8 * 2 ** order < errs[m][0] / errs[m][1] < 1.25 * 2 ** order, (m, errs)


@pytest.mark.parametrize("manifold,points,check", [
    ("sphere", unit, lambda x: (x.norm(dim=-1) - 1).abs().max().item() < 1e-6),
    ("torus", angles, lambda x: bool(((x >= 0) & (x < TWO_PI)).all())),
])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_solver_stays_on_the_manifold(manifold, points, check, method):
    """float32, 1000 steps of a rough field (a random MLP, large outputs): every state on the manifold."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))

    def field(x, t, y=None):
        return 20 * net(torch.cat([x, t[:, None]], -1))

    path = geodesic_path(manifold)
    for retraction in ("exp", "projx"):
        out = solver(method, 1000, path, retraction=retraction).sample(field, points(32, 3, 3).float(),
                                                                      intermediates=True)
        assert out.nfe == 1000 * {"euler": 1, "midpoint": 2, "rk4": 4}[method]
        assert out.trajectory.shape == (1001, 32, 3) and all(check(s) for s in out.trajectory)


def test_torus_constant_field_is_exact():
    c = torch.tensor([0.7, -2.9], dtype=F64)
    x = angles(16, 2, 1)
    for method in ("euler", "rk4"):
        out = solver(method, 7, geodesic_path("torus")).sample(lambda x, t, y=None: c.expand_as(x), x)
        assert torus_close(out.x, x + c) < 1e-12


def test_euclidean_manifold_is_the_ode_solver():
    path = geodesic_path("euclidean")
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)

    def field(x, t, y=None):
        return torch.tanh(x @ w) * (1 + t[:, None])

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    ode = registry.build("solver", {"plugin": "ode", "method": "rk4", "steps": 9})
    assert torch.allclose(solver("rk4", 9, path).sample(field, x).x, ode.sample(field, x).x, atol=1e-13)


def test_mismatches_are_config_errors():
    affine = registry.build("path", {"plugin": "affine"}, scheduler=registry.build("scheduler", {"plugin": "cond_ot"}))
    with pytest.raises(registry.ConfigError, match="riemannian_ode solver integrates on the manifold"):
        solver(path=affine)
    with pytest.raises(registry.ConfigError, match="riemannian_ode"):
        registry.build("solver", {"plugin": "ode"}, path=geodesic_path("sphere"))
    with pytest.raises(registry.ConfigError, match="riemannian_ode"):
        registry.build("solver", {"plugin": "sde"}, path=geodesic_path("sphere"))
    with pytest.raises(registry.ConfigError, match="convex scheduler"):
        geodesic_path("sphere", "cosine")
    vmf = registry.build("data", {"plugin": "vmf_mixture"}).spec
    with pytest.raises(registry.ConfigError, match="lies on the sphere"):
        geodesic_path("torus", spec=vmf)
    with pytest.raises(registry.ConfigError, match="shape"):
        geodesic_path("sphere", spec=DataSpec(shape=(1, 8, 8)))
    with pytest.raises(registry.ConfigError, match="independent"):
        registry.build("objective", {"plugin": "flow_matching", "coupling": "ot"}, spec=vmf,
                       path=geodesic_path("sphere", spec=vmf))
    objective = registry.build("objective", {"plugin": "flow_matching"}, spec=vmf,
                               path=geodesic_path("sphere", spec=vmf))
    with pytest.raises(registry.ConfigError, match="affine"):  # a Euclidean change of variables is not this model's
        registry.build("metric", {"plugin": "likelihood"}, spec=vmf, objective=objective)
    with pytest.raises(registry.ConfigError, match="latitudes"):
        registry.build("data", {"plugin": "vmf_mixture", "means": [[0.0, 95.0]]})


# --------------------------------------------------------------------------- vMF data
def test_vmf_cosines_follow_the_closed_form():
    from scipy import stats

    from plugins.data.vmf import sample_vmf

    kappa = 7.0
    mu = torch.tensor([0.3, -0.4, 0.866], dtype=F64)
    mu = mu / mu.norm()
    x = sample_vmf(mu, kappa, 20000, torch.Generator().manual_seed(0))
    assert (x.norm(dim=-1) - 1).abs().max() < 1e-12
    c = (x @ mu).numpy()

    def cdf(v):
        return (math.e ** (kappa * v) - math.exp(-kappa)) / (math.exp(kappa) - math.exp(-kappa))

    assert stats.kstest(c, cdf).pvalue > 1e-3
    assert abs(c.mean() - (1 / math.tanh(kappa) - 1 / kappa)) < 0.01
    tangent = x - torch.from_numpy(c)[:, None] * mu  # isotropic around mu: mean 0
    assert tangent.mean(0).abs().max() < 0.01


def test_vmf_data_is_on_the_sphere_and_renders(tmp_path):
    from core.testing import data as data_kit

    data = registry.build("data", {"plugin": "vmf_mixture"})
    data_kit.check_data_source(data, name="vmf_mixture")
    x = data.reference(500, torch.Generator().manual_seed(0))["x"]
    assert x.shape == (500, 3) and (x.norm(dim=-1) - 1).abs().max() < 1e-6
    (png,) = data.render({"x": x}, str(tmp_path / "pic"))
    assert png.endswith(".png") and (tmp_path / "pic.png").stat().st_size > 0


# --------------------------------------------------------------------------- the experiment
def test_short_training_beats_the_untrained_model(tmp_path):
    """experiments/riemannian_sphere.toml, shortened: the trained model's energy distance is far below the
    untrained one's, and ``flowforge sample`` of the run writes points on the sphere."""
    from core.run import run

    from ...conftest import ROOT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run(ROOT / "experiments" / "riemannian_sphere.toml",
                      ["trainer.steps=150", "trainer.batch_size=256", "trainer.progress='off'", "trainer.warmup_steps=10", "trainer.ema_decay=0.9",
                       "backbone.hidden=64", "backbone.depth=3", "solver.steps=10", "eval.num_samples=600",
                       "eval.num_pictures=0", "eval.floor=false", "trainer.checkpoint_every=150"], out=tmp_path / "run")
        from core.cli import main as cli

        assert cli(["sample", str(tmp_path / "run"), "-n", "200", "--npz", "--out", str(tmp_path / "s.npz")]) == 0
    finally:
        torch.set_num_threads(threads)
    trained, untrained = summary["metrics"]["energy_distance"], summary["untrained"]["energy_distance"]
    assert trained < 0.5 * untrained, (trained, untrained)
    import numpy as np

    x = np.load(tmp_path / "s.npz")["x"]
    assert x.shape == (200, 3) and np.abs(np.linalg.norm(x, axis=1) - 1).max() < 1e-6  # float32 samples on S^2
