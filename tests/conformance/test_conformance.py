"""Every first-party component passes the conformance kit of its kind (core/testing), and the kit catches broken ones.

Components are enumerated from the registry (``registry.available(kind)``,
distribution ``flowforge``), so a new first-party component is tested the day
it is registered. Components that need context, small options or files get a
recipe in the tables below; the others are built with their defaults and the
context the runner would give them (`generic`). A component without a recipe
that cannot be built with its defaults, or that raises something other than
the kit's AssertionError, is skipped with a message asking for a recipe here;
a component *with* a recipe must pass.

``FLOWFORGE_CONFORMANCE_SLOW=1`` also runs the kit on the launchers that start
processes or jobs (accelerate with 2 processes, slurm through submitit's local
executor); tests/e2e/test_distributed.py covers them otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import registry
from core.interfaces import (
    Binned,
    ConvexScheduler,
    DataSource,
    DataSpec,
    Launcher,
    Objective,
    PathSample,
    Scheduler,
    SchedulerOutput,
    Solver,
    SolverResult,
)
from core.interfaces import Path as PathInterface
from core.testing import backbones as backbone_kit
from core.testing import data as data_kit
from core.testing import launchers as launcher_kit
from core.testing import metrics as metric_kit
from core.testing import objectives as objective_kit
from core.testing import paths as path_kit
from core.testing import schedulers as scheduler_kit
from core.testing import solvers as solver_kit
from registry import hookimpl

SLOW = os.environ.get("FLOWFORGE_CONFORMANCE_SLOW") == "1"
Check = Callable[[], None]


def first_party(kind: str) -> list[str]:
    return [n for n in registry.available(kind) if registry.get(kind, n).distribution == "flowforge"]


def build(kind: str, name: str, options: dict | None = None, **context):
    return registry.build(kind, {"plugin": name, **(options or {})}, **context)


def cases(kind: str, recipes: dict[str, dict[str, Check]], not_applicable: dict[str, str]) -> list:
    """pytest params ``(name, variant)`` for every first-party component of `kind`."""
    out = []
    for name in first_party(kind):
        if name in not_applicable:
            out.append(pytest.param(name, "-", id=name, marks=pytest.mark.skip(reason=not_applicable[name])))
        elif name in recipes:
            out.extend(pytest.param(name, variant, id=f"{name}-{variant}") for variant in recipes[name])
        else:
            out.append(pytest.param(name, "generic", id=f"{name}-generic"))
    return out


def run_case(kind: str, name: str, variant: str, recipes: dict[str, dict[str, Check]],
             generic: Callable[[str], Check]) -> None:
    if name in recipes:
        recipes[name][variant]()
        return
    try:
        check = generic(name)
    except (registry.ConfigError, TypeError, ValueError) as exc:
        pytest.skip(f"{kind} {name!r} does not build with its defaults ({exc}); "
                    f"add a recipe to tests/conformance/test_conformance.py")
    try:
        check()
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{kind} {name!r} could not be exercised with the generic recipe ({type(exc).__name__}: {exc}); "
                    f"add a recipe to tests/conformance/test_conformance.py")


# --------------------------------------------------------------------------- shared context
SPEC_2D = DataSpec(shape=(2,))
SPEC_TOKENS = DataSpec(shape=(3,), kind="discrete", vocab_size=6)


def cond_ot() -> Scheduler:
    return build("scheduler", "cond_ot")


def mlp(spec: DataSpec, **options) -> nn.Module:
    return build("backbone", "mlp", {"hidden": 32, "depth": 2, **options}, spec=spec)


def batch_2d(n: int = 16) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(n, 2, generator=torch.Generator().manual_seed(0))}


# --------------------------------------------------------------------------- schedulers
SCHEDULER_RECIPES: dict[str, dict[str, Check]] = {}


def generic_scheduler(name: str) -> Check:
    scheduler = build("scheduler", name, spec=SPEC_2D)
    return lambda: scheduler_kit.check_scheduler(scheduler, max_examples=25)


@pytest.mark.parametrize("name,variant", cases("scheduler", SCHEDULER_RECIPES, {}))
def test_scheduler(name, variant):
    run_case("scheduler", name, variant, SCHEDULER_RECIPES, generic_scheduler)


# --------------------------------------------------------------------------- paths
def check_discrete_path(path: PathInterface, spec: DataSpec, who: str, mixture: bool = True) -> None:
    """For discrete paths over token ids: a seeded source, token ids shaped like the data, x_1 at t=1,
    velocities whose rows sum to zero with non-negative jump rates, and an ELBO integrand that is
    non-negative and zero at the one-hot posterior of x_1. Mixture paths also: every token of x_t
    from x_0 or x_1, and x_0 at t=0."""
    g = torch.Generator().manual_seed(0)
    x_0 = path.sample_source((8, *spec.shape), generator=torch.Generator().manual_seed(1))
    again = path.sample_source((8, *spec.shape), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x_0, again), f"{who} violates 'seeded source': sample_source is not a function of the generator"
    x_1 = torch.randint(0, path.data_vocab, (8, *spec.shape), generator=g)
    for t_value in (0.0, 0.37, 1.0):
        ps = path.sample(x_0, x_1, torch.full((8,), t_value), generator=g)
        assert isinstance(ps, PathSample) and ps.x_t.shape == x_1.shape and ps.x_t.dtype == x_1.dtype, (
            f"{who} violates 'shapes': x_t must be token ids shaped like the data")
        if mixture:
            assert bool(((ps.x_t == x_0) | (ps.x_t == x_1)).all()), (
                f"{who} violates 'mixture': every token of x_t comes from x_0 or x_1")
        if t_value == 0.0 and mixture:
            assert torch.equal(ps.x_t, x_0), f"{who} violates 'boundaries': x_t != x_0 at t = 0"
        if t_value == 1.0:
            assert torch.equal(ps.x_t, x_1), f"{who} violates 'boundaries': x_t != x_1 at t = 1"
        if t_value == 1.0:
            continue
        t = torch.full((8,), t_value, dtype=torch.float64)
        logits = torch.randn(*x_1.shape, path.vocab_size, generator=g, dtype=torch.float64)
        log_p = path.log_posterior(logits, ps.x_t, t)
        u = path.velocity(log_p.exp(), ps.x_t, t)
        off = ~torch.nn.functional.one_hot(ps.x_t, path.vocab_size).bool()
        assert torch.allclose(u.sum(-1), torch.zeros_like(u.sum(-1)), atol=1e-9 * (1 + u.abs().max().item())) and bool(
            (u[off] >= 0).all()), f"{who} violates 'velocity': rows sum to zero, off-diagonal rates >= 0"
        assert bool((path.generalized_kl(log_p, x_1, ps.x_t, t) >= -1e-9).all()), (
            f"{who} violates 'ELBO integrand': the generalized KL is non-negative")
        exact = torch.nn.functional.one_hot(x_1, path.vocab_size).double().clamp_min(1e-300).log()
        gkl = path.generalized_kl(exact, x_1, ps.x_t, t)
        assert torch.allclose(gkl, torch.zeros_like(gkl), atol=1e-9), (
            f"{who} violates 'ELBO integrand': zero at the one-hot posterior of x_1")


def check_path_basics(path: PathInterface) -> None:
    """Shapes and a seeded source, for paths whose target is not the velocity (e.g. DDPM's epsilon)."""
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    x_1 = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    path_kit.check_sample_at(path, x_0, x_1, torch.rand(4, generator=g, dtype=torch.float64))
    path_kit.check_source(path, (2, 3), 4, seed=5)


PATH_RECIPES: dict[str, dict[str, Check]] = {
    "affine": {
        "cond_ot": lambda: path_kit.check_affine_path(build("path", "affine", scheduler=cond_ot()), max_examples=15),
        "cosine": lambda: path_kit.check_affine_path(
            build("path", "affine", scheduler=build("scheduler", "cosine")), max_examples=15),
    },
    "gaussian_diffusion": {
        "basics": lambda: check_path_basics(build("path", "gaussian_diffusion", {"steps": 50}, spec=SPEC_2D)),
    },
    "mixture_discrete": {
        "uniform": lambda: _mixture_check("uniform", mask_token=False),
        "mask": lambda: _mixture_check("mask", mask_token=True),
    },
    "metric_discrete": {m: (lambda m=m: _metric_check(m)) for m in ("absolute", "squared", "hamming")},
}


class FrozenLatent(PathInterface):
    """A stochastic interpolant with its latent ``z`` a fixed function of the data's shape (seeded), so that the
    kit's invariants (``target = d x_t / dt`` at fixed ``x_0, x_1, z``) apply to its ``sample(x_0, x_1, t)``."""

    def __init__(self, path):
        self.path = path

    def sample(self, x_0, x_1, t):
        z = torch.randn(x_1.shape, generator=torch.Generator().manual_seed(11), dtype=x_1.dtype)
        return self.path.sample(x_0, x_1, t, z=z)

    def sample_source(self, shape, generator=None, device=None):
        return self.path.sample_source(shape, generator, device)

    def __repr__(self) -> str:
        return f"FrozenLatent({self.path!r})"


def _interpolant_check(name: str, options: dict) -> None:
    path = build("path", name, options, spec=SPEC_2D, scheduler=cond_ot())
    # t in (0, 1): the brownian gamma's derivative is infinite at the ends
    path_kit.check_sample_at(path, *path_kit_draw(), torch.tensor([0.3, 0.7], dtype=torch.float64))
    frozen = FrozenLatent(path)
    for t in (0.1, 0.5, 0.9):
        path_kit.check_target_is_velocity_at(frozen, *path_kit_draw(), torch.full((2,), t, dtype=torch.float64),
                                             rtol=1e-7, atol=1e-8)
    path_kit.check_source(path, (2, 3), 4, seed=5)


def path_kit_draw():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 2, 3, generator=g, dtype=torch.float64), torch.randn(2, 2, 3, generator=g, dtype=torch.float64)


PATH_RECIPES["interpolant"] = {
    "brownian": lambda: _interpolant_check("interpolant", {"gamma": "brownian", "a": 0.5}),
    "quadratic": lambda: _interpolant_check("interpolant", {"gamma": "quadratic", "a": 2.0}),
}
PATH_RECIPES["schrodinger_bridge"] = {"sigma": lambda: _interpolant_check("schrodinger_bridge", {"sigma": 0.7})}


def _geodesic_check(manifold: str) -> None:
    """Points on the manifold (the kit's Gaussian draws are not), t in (0, 1) and at the ends."""
    path = build("path", "geodesic", {"manifold": manifold}, scheduler=cond_ot())
    g = torch.Generator().manual_seed(3)
    x_0, x_1 = path.sample_source((6, 3), generator=g, dtype=torch.float64), path.sample_source(
        (6, 3), generator=g, dtype=torch.float64)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        t = torch.full((6,), t, dtype=torch.float64)
        path_kit.check_sample_at(path, x_0, x_1, t)
        path_kit.check_target_is_velocity_at(path, x_0, x_1, t, rtol=1e-8, atol=1e-9)
    path_kit.check_source(path, (3,), 4, seed=5)


PATH_RECIPES["geodesic"] = {m: (lambda m=m: _geodesic_check(m)) for m in ("sphere", "torus", "euclidean")}


def _mixture_check(source: str, mask_token: bool) -> None:
    spec = build("data", "toy2d_discrete", {"bins": 8, "mask_token": mask_token}).spec
    path = build("path", "mixture_discrete", {"source": source}, spec=spec, scheduler=cond_ot())
    check_discrete_path(path, spec, f"path 'mixture_discrete' ({source} source)")


def _metric_check(metric: str) -> None:
    spec = build("data", "toy2d_discrete", {"bins": 8}).spec
    path = build("path", "metric_discrete", {"metric": metric}, spec=spec)
    check_discrete_path(path, spec, f"path 'metric_discrete' ({metric})", mixture=False)


def generic_path(name: str) -> Check:
    path = build("path", name, spec=SPEC_2D, scheduler=cond_ot())
    return lambda: path_kit.check_path(path, max_examples=15)


@pytest.mark.parametrize("name,variant", cases("path", PATH_RECIPES, {}))
def test_path(name, variant):
    run_case("path", name, variant, PATH_RECIPES, generic_path)


# --------------------------------------------------------------------------- solvers
def check_sampler_basics(solver: Solver, x_init: torch.Tensor, fn: Callable, who: str,
                         counting: type = solver_kit.CountingField) -> None:
    """What every solver owes the runner: a SolverResult shaped and typed like the input, nfe equal to
    the model calls it made (with t of shape (B,)), and samples that depend only on the generator."""
    field = counting(fn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        out = solver.sample(field, x_init, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(2)
        again = solver.sample(counting(fn), x_init, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, SolverResult), f"{who} violates 'returns a SolverResult': got {type(out).__name__}"
    assert out.x.shape == x_init.shape and out.x.dtype == x_init.dtype, (
        f"{who} violates 'shape and dtype': {tuple(out.x.shape)} {out.x.dtype} "
        f"for {tuple(x_init.shape)} {x_init.dtype}")
    if out.x.dtype.is_floating_point:
        assert bool(torch.isfinite(out.x).all()), f"{who} violates 'finite samples'"
    assert out.nfe == field.calls > 0, f"{who} violates 'nfe = model calls': reported {out.nfe}, made {field.calls}"
    assert torch.equal(out.x, again.x), f"{who} violates 'samples depend only on the generator'"


ODE_METHODS = {"euler": (1, 1), "midpoint": (2, 2), "heun": (2, 2), "rk4": (4, 4)}


def _ddpm_path():
    return build("path", "gaussian_diffusion", {"steps": 50}, spec=SPEC_2D)


def _discrete_logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*x.shape, SPEC_TOKENS.vocab_size)


class IntervalCountingField(solver_kit.CountingField):
    """A counting average-velocity field ``f(x, t, y, r)`` (MeanFlow's sampler passes the interval's end r)."""

    def __call__(self, x, t, y=None, r=None):
        assert r is not None and r.shape == t.shape, "the meanflow solver passes r of shape (B,)"
        return super().__call__(x, t, y) * (1 + r[:, None] - t[:, None])


SOLVER_RECIPES: dict[str, dict[str, Check]] = {
    "meanflow": {
        "basics": lambda: check_sampler_basics(build("solver", "meanflow", {"steps": 3}), torch.randn(5, 2),
                                               lambda x, t: -x, "solver 'meanflow'", IntervalCountingField),
    },
    "ode": {
        "kit": lambda: solver_kit.check_solver(
            lambda method, steps: build("solver", "ode", {"method": method, "steps": steps}), ODE_METHODS,
            steps=(1, 4)),
        "dopri5": lambda: check_sampler_basics(build("solver", "ode", {"method": "dopri5"}, scheduler=cond_ot()),
                                               torch.randn(5, 2, dtype=torch.float64), lambda x, t: -x,
                                               "solver 'ode' dopri5"),
    },
    "riemannian_ode": {
        # on R^D the Riemannian steps are the ode solver's, so the whole kit (exactness, orders, nfe) applies
        "euclidean-kit": lambda: solver_kit.check_solver(
            lambda method, steps: build("solver", "riemannian_ode", {"method": method, "steps": steps},
                                        path=build("path", "geodesic", {"manifold": "euclidean"})),
            ODE_METHODS, steps=(1, 4)),
        "sphere": lambda: check_sampler_basics(
            build("solver", "riemannian_ode", {"steps": 5}, path=build("path", "geodesic")),
            torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=-1),
            lambda x, t: torch.cross(torch.ones_like(x), x, dim=-1), "solver 'riemannian_ode'"),
    },
    "one_step": {
        "basics": lambda: check_sampler_basics(build("solver", "one_step", scheduler=cond_ot(), spec=SPEC_2D),
                                               torch.randn(5, 2), lambda x, t: -x, "solver 'one_step'"),
    },
    "ddim": {
        "basics": lambda: check_sampler_basics(build("solver", "ddim", {"eta": 1.0}, path=_ddpm_path()),
                                               torch.randn(5, 2), lambda x, t: 0.1 * x, "solver 'ddim'"),
    },
    "ddpm_ancestral": {
        "basics": lambda: check_sampler_basics(build("solver", "ddpm_ancestral", path=_ddpm_path()),
                                               torch.randn(5, 2), lambda x, t: 0.1 * x, "solver 'ddpm_ancestral'"),
    },
    "discrete_euler": {
        "basics": lambda: check_sampler_basics(
            build("solver", "discrete_euler", {"steps": 8},
                  path=build("path", "mixture_discrete", spec=SPEC_TOKENS, scheduler=cond_ot())),
            torch.randint(0, SPEC_TOKENS.vocab_size, (5, 3)), _discrete_logits, "solver 'discrete_euler'"),
    },
}


def generic_solver(name: str) -> Check:
    solver = build("solver", name, spec=SPEC_2D, scheduler=cond_ot(), path=build("path", "affine", scheduler=cond_ot()))
    return lambda: check_sampler_basics(solver, torch.randn(5, 2), lambda x, t: -x, f"solver {name!r}")


@pytest.mark.parametrize("name,variant", cases("solver", SOLVER_RECIPES, {}))
def test_solver(name, variant):
    run_case("solver", name, variant, SOLVER_RECIPES, generic_solver)


# --------------------------------------------------------------------------- backbones
UNET_TINY = {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
             "num_heads": 2, "norm_groups": 8}
DIT_TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2}
IMAGES = DataSpec(shape=(1, 8, 8), num_classes=3)
IMAGE_TOKENS = DataSpec(shape=(1, 8, 8), kind="discrete", vocab_size=5)


def backbone_check(name: str, options: dict, spec: DataSpec, out_shape=None) -> Check:
    return lambda: backbone_kit.check_backbone(build("backbone", name, options, spec=spec), spec, name=name,
                                               out_shape=out_shape)


BACKBONE_RECIPES: dict[str, dict[str, Check]] = {
    "mlp": {
        "2d": backbone_check("mlp", {"hidden": 32, "depth": 2}, SPEC_2D),
        "labels": backbone_check("mlp", {"hidden": 32, "depth": 2}, DataSpec(shape=(2,), num_classes=3)),
        "tokens": backbone_check("mlp", {"hidden": 32, "depth": 2}, SPEC_TOKENS),
        "learned-sigma": backbone_check("mlp", {"hidden": 32, "depth": 2, "out_channels_mult": 2},
                                        DataSpec(shape=(2, 3)), out_shape=(4, 3)),
    },
    "unet": {
        "images-labels": backbone_check("unet", UNET_TINY, IMAGES),
        "learned-sigma": backbone_check("unet", {**UNET_TINY, "learn_sigma": True}, DataSpec(shape=(3, 8, 8)),
                                        out_shape=(6, 8, 8)),
        "tokens": backbone_check("unet", UNET_TINY, IMAGE_TOKENS),
    },
    "dit": {
        "images-labels": backbone_check("dit", DIT_TINY, IMAGES),
        "tokens": backbone_check("dit", DIT_TINY, IMAGE_TOKENS),
    },
}
def classifier_check(name: str, options: dict, spec: DataSpec) -> Check:
    """A noisy-image classifier: logits ``(B, num_classes)``; every backbone check but label conditioning
    (it reads labels only as its training target)."""
    def check() -> None:
        model = build("backbone", name, options, spec=spec)
        kw = {"name": name, "batch_size": 3}
        backbone_kit.check_output(model, spec, out_shape=(spec.num_classes,), **kw)
        for check_one in (backbone_kit.check_scalar_time, backbone_kit.check_items_independent,
                          backbone_kit.check_eval_determinism, backbone_kit.check_time_conditioning,
                          backbone_kit.check_gradients):
            check_one(model, spec, **kw)
    return check


BACKBONE_RECIPES["unet_classifier"] = {"digits": classifier_check("unet_classifier", {"preset": "digits"}, IMAGES)}
BACKBONE_NOT_APPLICABLE = {
    "clip": "a CLIP model (image and text towers) is not called as model(x, t, y); the objective kit runs it "
            "through clip_contrastive, and tests/plugins/tinyclip/test_tinyclip.py covers it",
}


def generic_backbone(name: str) -> Check:
    return backbone_check(name, {}, IMAGES)


@pytest.mark.parametrize("name,variant", cases("backbone", BACKBONE_RECIPES, BACKBONE_NOT_APPLICABLE))
def test_backbone(name, variant):
    run_case("backbone", name, variant, BACKBONE_RECIPES, generic_backbone)


# --------------------------------------------------------------------------- objectives
def objective_check(name: str, options: dict, spec: DataSpec, context: dict, model: nn.Module, batch: dict,
                    **kw) -> None:
    objective_kit.check_objective(lambda: build("objective", name, options, spec=spec, **context),
                                  {"model": model}, batch, name=name, **kw)


def flow_check(name: str, options: dict) -> Check:
    def check() -> None:
        scheduler = cond_ot()
        context = {"scheduler": scheduler, "path": build("path", "affine", scheduler=scheduler)}
        objective_check(name, options, SPEC_2D, context, mlp(SPEC_2D), batch_2d())
    return check


def ddpm_check(options: dict) -> Check:
    return lambda: objective_check("ddpm", options, SPEC_2D, {"path": _ddpm_path()}, mlp(SPEC_2D), batch_2d())


def _discrete_fm_check() -> None:
    path = build("path", "mixture_discrete", spec=SPEC_TOKENS, scheduler=cond_ot())
    batch = {"x": torch.randint(0, SPEC_TOKENS.vocab_size, (16, 3), generator=torch.Generator().manual_seed(0))}
    objective_check("discrete_fm", {}, SPEC_TOKENS, {"path": path, "scheduler": cond_ot()}, mlp(SPEC_TOKENS), batch)


def _clip_parts():
    data = build("data", "clip_shapes", {"train_size": 64, "held_out_size": 16})
    batch = next(data.train_batches(8, seed=0))
    return data.spec, batch, lambda: build("backbone", "clip", {"embed_dim": 16, "width": 16, "depth": 1, "heads": 2},
                                           spec=data.spec)


def _clip_check() -> None:
    spec, batch, make_clip = _clip_parts()
    objective_check("clip_contrastive", {}, spec, {}, make_clip(), batch, sampling=False)


def _tinyclip_check() -> None:
    """The teacher: a run directory (config.toml + one checkpoint) made on the spot."""
    import tempfile

    import tomli_w

    from core import checkpoint

    spec, batch, make_clip = _clip_parts()
    teacher_options = {"plugin": "clip", "embed_dim": 16, "width": 16, "depth": 1, "heads": 2}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "config.toml").write_text(tomli_w.dumps({"backbone": teacher_options}))
        checkpoint.save_atomic({"step": 0, "model": make_clip().state_dict(), "ema": None},
                               checkpoint.path_for(run / "checkpoints", 0))
        objective_check("tinyclip_distill", {"teacher": str(run), "teacher_weights": "model"}, spec, {}, make_clip(),
                        batch, sampling=False)


OBJECTIVE_RECIPES: dict[str, dict[str, Check]] = {
    "velocity_mse": {"2d": flow_check("velocity_mse", {"time_sampler": "logit_normal"})},
    "flow_matching": {
        "velocity": flow_check("flow_matching", {}),
        "epsilon-min-snr": flow_check("flow_matching", {"prediction": "epsilon", "loss_weighting": "min_snr"}),
        "x1": flow_check("flow_matching", {"prediction": "x1"}),
    },
    "meanflow": {
        "interval-mlp": lambda: objective_check("meanflow", {}, SPEC_2D, {"path": build("path", "affine",
                                                scheduler=cond_ot())}, mlp(SPEC_2D, interval_input=True), batch_2d()),
        "uniform-plain-loss": lambda: objective_check("meanflow", {"time_sampler": "uniform", "weight_power": 0.0,
                                                      "ratio": 1.0}, SPEC_2D, {"path": build("path", "affine",
                                                      scheduler=cond_ot())}, mlp(SPEC_2D, interval_input=True),
                                                      batch_2d()),
    },
    "ddpm": {
        "mse": ddpm_check({}),
        "importance-sampling": ddpm_check({"schedule_sampler": "loss-second-moment"}),
    },
    "discrete_fm": {"tokens": _discrete_fm_check},
    "clip_contrastive": {"clip": _clip_check},
    "tinyclip_distill": {"teacher-run": _tinyclip_check},
}


def generic_objective(name: str) -> Check:
    return flow_check(name, {})


@pytest.mark.parametrize("name,variant", cases("objective", OBJECTIVE_RECIPES, {}))
def test_objective(name, variant):
    run_case("objective", name, variant, OBJECTIVE_RECIPES, generic_objective)


# --------------------------------------------------------------------------- data
def data_check(name: str, options: dict | None = None, **kw) -> Check:
    return lambda: data_kit.check_data_source(build("data", name, options), name=name, **kw)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> SimpleNamespace:
    """Small files for the data sources that read from disk: an .npz, images, a caption CSV, CIFAR-10 batches."""
    import pickle

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("data-files")
    rng = np.random.default_rng(0)
    np.savez(root / "arrays.npz", x=rng.standard_normal((40, 3)).astype("float32"), y=rng.integers(0, 4, 40))
    rows = ["filepath,caption"]
    for label in ("cat", "dog"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(6):
            path = root / "images" / label / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(path)
            rows.append(f"{path},a photo of a {label}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 10)]}
        with open(cifar / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(cifar / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, fh)
    return SimpleNamespace(root=root, npz=root / "arrays.npz", images=root / "images", captions=root / "captions.csv",
                           cifar=root)


DATA_RECIPES: dict[str, dict[str, Check]] = {
    "toy2d": {"checkerboard": data_check("toy2d")},
    "vmf_mixture": {"sphere": data_check("vmf_mixture")},
    "toy2d_discrete": {"tokens": data_check("toy2d_discrete", {"bins": 16}),
                       "mask-token": data_check("toy2d_discrete", {"bins": 16, "mask_token": True})},
    "digits": {"continuous": data_check("digits", exact_partition=True)},
    "text": {"characters": data_check("text", {"seq_len": 16})},
    "clip_digits": {"captions": data_check("clip_digits", exact_partition=True)},
    "clip_shapes": {"captions": data_check("clip_shapes", {"train_size": 64, "held_out_size": 16},
                                           exact_partition=True)},
    "with_mask_token": {"toy2d_discrete": data_check("with_mask_token",
                                                     {"data": {"plugin": "toy2d_discrete", "bins": 16}})},
}
#: Data sources that read files: built from `data_files` inside the test.
DATA_FILE_RECIPES: dict[str, Callable[[SimpleNamespace], Check]] = {
    "npz": lambda f: data_check("npz", {"path": str(f.npz), "num_classes": 4}, exact_partition=True),
    "imagefolder": lambda f: data_check("imagefolder", {"root": str(f.images), "resolution": 8, "num_workers": 0,
                                                        "held_out_fraction": 0.2}, exact_partition=True),
    "clip_pairs": lambda f: data_check("clip_pairs", {"train": str(f.captions), "image_size": 8,
                                                      "held_out_fraction": 0.25}),
    "cifar10": lambda f: data_check("cifar10", {"root": str(f.cifar)}, exact_partition=True),
}
DATA_NOT_APPLICABLE = {
    "reflow_pairs": "generates its couplings from a trained run directory; tests of the rectified_flow plugin cover it",
    "shape_only": "holds no examples by design (the data spec of an imported model); tests/plugins/dit/test_import_dit.py covers it",
}


def generic_data(name: str) -> Check:
    return data_check(name)


DATA_CASES = cases("data", {**DATA_RECIPES, **{k: {"files": None} for k in DATA_FILE_RECIPES}}, DATA_NOT_APPLICABLE)


@pytest.mark.parametrize("name,variant", DATA_CASES)
def test_data(name, variant, data_files):
    if name in DATA_FILE_RECIPES:
        DATA_FILE_RECIPES[name](data_files)()
        return
    run_case("data", name, variant, DATA_RECIPES, generic_data)


# --------------------------------------------------------------------------- metrics
def _samples_2d():
    data = build("data", "toy2d")
    return data, data.reference(128, torch.Generator().manual_seed(0))["x"]


def sample_metric_check(name: str, options: dict | None = None, best_value: float | None = None) -> Check:
    def check() -> None:
        data, samples = _samples_2d()
        metric = build("metric", name, options, spec=data.spec, data=data)
        metric_kit.check_sample_metric(metric, samples, name=name, best_value=best_value)
    return check


def _dequantized_check() -> None:
    data = build("data", "toy2d_discrete", {"bins": 16})
    tokens = data.reference(128, torch.Generator().manual_seed(0))["x"]
    metric = build("metric", "dequantized", {"metric": {"plugin": "energy_distance"}}, spec=data.spec, data=data)
    metric_kit.check_sample_metric(metric, tokens, name="dequantized", other=(tokens + 3).clamp(max=15), best_value=0.0)


def model_metric_check(name: str, options: dict, continuous: bool = True) -> Check:
    def check() -> None:
        if continuous:
            data, spec, context = build("data", "toy2d"), SPEC_2D, {}
        else:
            data = build("data", "toy2d_discrete", {"bins": 16})
            spec = data.spec
            context = {"path": build("path", "mixture_discrete", spec=spec, scheduler=cond_ot())}
        metric = build("metric", name, options, spec=spec, data=data, **context)
        metric_kit.check_model_metric(metric, mlp(spec), data, name=name)
    return check


def _zero_shot_check() -> None:
    data = build("data", "clip_shapes", {"train_size": 64, "held_out_size": 16})
    model = build("backbone", "clip", {"embed_dim": 16, "width": 16, "depth": 1, "heads": 2}, spec=data.spec)
    metric = build("metric", "zero_shot", {"num_examples": 16, "batch_size": 16}, spec=data.spec, data=data)
    metric_kit.check_model_metric(metric, model, data, name="zero_shot")


METRIC_RECIPES: dict[str, dict[str, Check]] = {
    "energy_distance": {"2d": sample_metric_check("energy_distance", best_value=0.0)},
    "sliced_wasserstein": {"2d": sample_metric_check("sliced_wasserstein", best_value=0.0)},
    "frechet_distance": {"raw-features": sample_metric_check("frechet_distance", {"feature_extractor": "raw"}, 0.0)},
    "kid": {"raw-features": sample_metric_check("kid", {"feature_extractor": "raw", "subsets": 10, "subset_size": 32})},
    "precision_recall": {"raw-features": sample_metric_check("precision_recall", {"feature_extractor": "raw"})},
    "dequantized": {"energy_distance": _dequantized_check},
    "few_step": {"2d": model_metric_check("few_step", {"num_samples": 64, "batch_size": 64})},
    "likelihood": {"2d": model_metric_check("likelihood", {"num_samples": 32, "batch_size": 32, "method": "euler",
                                                           "steps": 4})},
    "ddpm_bpd": {"2d": model_metric_check("ddpm_bpd", {"schedule": "cosine", "steps": 20, "num_examples": 16,
                                                       "batch_size": 16})},
    "discrete_elbo": {"tokens": model_metric_check("discrete_elbo", {"num_examples": 32, "times": 2, "batch_size": 32},
                                                   continuous=False)},
    "discrete_infill": {"tokens": model_metric_check("discrete_infill", {"num_examples": 16, "steps": 4, "examples": 2},
                                                     continuous=False)},
    "zero_shot": {"clip": _zero_shot_check},
}


def generic_metric(name: str) -> Check:
    data, samples = _samples_2d()
    metric = build("metric", name, spec=data.spec, data=data)
    if hasattr(metric, "evaluate"):
        return lambda: metric_kit.check_model_metric(metric, mlp(SPEC_2D), data, name=name)
    return lambda: metric_kit.check_sample_metric(metric, samples, name=name)


@pytest.mark.parametrize("name,variant", cases("metric", METRIC_RECIPES, {}))
def test_metric(name, variant):
    run_case("metric", name, variant, METRIC_RECIPES, generic_metric)


# --------------------------------------------------------------------------- launchers
def launcher_check(name: str, options: dict | None = None, slow: bool = False) -> Check:
    def check() -> None:
        if slow and not SLOW:
            pytest.skip("starts processes or jobs: tests/e2e/test_distributed.py covers it; set "
                        "FLOWFORGE_CONFORMANCE_SLOW=1 to run the kit on it")
        launcher_kit.check_launcher(build("launcher", name, options), name=name)
    return check


LAUNCHER_RECIPES: dict[str, dict[str, Check]] = {
    "local": {"cpu": launcher_check("local", {"device": "cpu"})},
    "accelerate": {"1-process": launcher_check("accelerate", {"num_processes": 1, "device": "cpu"}),
                   "2-processes": launcher_check("accelerate", {"num_processes": 2, "device": "cpu"}, slow=True)},
    "slurm": {"submitit-local": launcher_check("slurm", {"executor": "local", "gpus_per_node": 0, "cpus_per_task": 1},
                                               slow=True)},
}


def generic_launcher(name: str) -> Check:
    return launcher_check(name, slow=True)


@pytest.mark.parametrize("name,variant", cases("launcher", LAUNCHER_RECIPES, {}))
def test_launcher(name, variant):
    run_case("launcher", name, variant, LAUNCHER_RECIPES, generic_launcher)


# --------------------------------------------------------------------------- broken plugins fail the kit
class MiscountingEuler(Solver):
    """Euler, but reports one evaluation too many."""

    def __init__(self, steps: int = 4):
        self.steps = steps

    def sample(self, model, x_init, *, y=None, generator=None, intermediates=False):
        x = x_init
        for k in range(self.steps):
            x = x + model(x, torch.full((x.shape[0],), k / self.steps, dtype=x.dtype), y) / self.steps
        return SolverResult(x=x, nfe=self.steps + 1)


class WrongDerivative(ConvexScheduler):
    """alpha_t = t^2 with d_alpha_t = t (should be 2t)."""

    def __call__(self, t):
        return SchedulerOutput(alpha_t=t * t, sigma_t=1 - t * t, d_alpha_t=t, d_sigma_t=-t)

    def snr_inverse(self, snr):
        return torch.sqrt(torch.where(torch.isinf(snr), torch.ones_like(snr), snr / (1 + snr)))

    def kappa_inverse(self, kappa):
        return torch.sqrt(kappa)


class WrongTargetPath(PathInterface):
    """x_t = t x_1 + (1 - t) x_0 but the target forgets the x_0 term."""

    def sample(self, x_0, x_1, t):
        tt = t.reshape(-1, *([1] * (x_1.ndim - 1)))
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=tt * x_1 + (1 - tt) * x_0, target=x_1)

    def sample_source(self, shape, generator=None, device=None, *, dtype=None, draw=None):
        return torch.randn(*shape, generator=generator)

    def __repr__(self):
        return "WrongTargetPath()"


class BatchNormalisedNet(nn.Module):
    """Leaks batch statistics between items (subtracts the batch mean), and keeps an unused parameter."""

    def __init__(self, spec: DataSpec, leak: bool = True, unused: bool = False, use_t: bool = True):
        super().__init__()
        self.lin = nn.Linear(2 + 1, 2)
        self.leak, self.use_t = leak, use_t
        self.unused = nn.Parameter(torch.zeros(3)) if unused else None

    def forward(self, x, t, y=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        h = self.lin(torch.cat([x, (t if self.use_t else torch.zeros_like(t))[:, None]], dim=1))
        return h - h.mean(0, keepdim=True) if self.leak else h


class TensorLoggingObjective(Objective):
    """Logs a tensor that still carries the graph (and a whole vector): neither is a loggable value."""

    def loss(self, models, batch, step):
        err = (models["model"](batch["x"], torch.rand(len(batch["x"])), None) - batch["x"]).pow(2)
        return err.mean(), {"err": err.mean(), "per_example": err.detach().mean(1)}


class MisbinnedObjective(Objective):
    """Logs a `Binned` whose positions leave [0, 1] (times off the unit interval): not a loggable value."""

    def loss(self, models, batch, step):
        t = torch.rand(len(batch["x"]))
        err = (models["model"](batch["x"], t, None) - batch["x"]).pow(2)
        return err.mean(), {"by_t": Binned(err.detach().mean(1), 2 * t, 4)}


class ForgetfulObjective(Objective):
    """Weights the loss by a call counter it does not checkpoint."""

    def __init__(self):
        self.calls = 0

    def loss(self, models, batch, step):
        self.calls += 1
        err = (models["model"](batch["x"], torch.full((len(batch["x"]),), 0.5), None) - batch["x"]).pow(2).mean()
        return err * self.calls, {}


class GlobalNoiseObjective(Objective):
    """Denoising with noise from torch's global RNG instead of the batch's seeds (core.rng)."""

    def loss(self, models, batch, step):
        x = batch["x"]
        noisy = x + torch.randn_like(x)
        return (models["model"](noisy, torch.full((len(x),), 0.5), None) - x).pow(2).mean(), {}


class GlobalRNGData(DataSource):
    """Draws training batches from torch's global RNG instead of (seed, step, rank)."""

    spec = SPEC_2D

    def train_batches(self, batch_size, *, seed, start_step=0, rank=0, world_size=1):
        while True:
            yield {"x": torch.randn(batch_size, 2)}

    def reference(self, n, generator):
        return {"x": torch.randn(n, 2, generator=generator)}


class RankBlindData(GlobalRNGData):
    """Seeded by (seed, step) but not by rank: every process trains on the same examples."""

    def train_batches(self, batch_size, *, seed, start_step=0, rank=0, world_size=1):
        step = start_step
        while True:
            yield {"x": torch.randn(batch_size, 2, generator=torch.Generator().manual_seed(seed * 1000 + step))}
            step += 1


class OffsetMetric:
    """A 'distance' that is 1 for identical sets."""

    higher_is_better = False

    def __init__(self):
        self.reset()

    def reset(self):
        self.real, self.fake = [], []

    def update(self, samples, real):
        (self.real if real else self.fake).append(samples)

    def compute(self):
        return (torch.cat(self.real).mean(0) - torch.cat(self.fake).mean(0)).norm() + 1.0


class StickyMetric(OffsetMetric):
    """Never forgets: reset() does nothing."""

    def __init__(self):
        self.real, self.fake = [], []

    def reset(self):
        pass

    def compute(self):
        return (torch.cat(self.real).mean(0) - torch.cat(self.fake).mean(0)).norm()


class SilentLauncher(Launcher):
    """Swallows the training function's errors."""

    def launch(self, entry, *args, accelerator_kwargs):
        from accelerate import Accelerator

        try:
            return entry(Accelerator(cpu=True), *args)
        except Exception:  # noqa: BLE001
            return None


BROKEN = {
    ("solver", "miscounting_euler"): (lambda: MiscountingEuler(), "reported nfe 5, expected steps x stages"),
    ("scheduler", "wrong_derivative"): (lambda: WrongDerivative(), "d_alpha_t does not match autograd"),
    ("path", "wrong_target"): (lambda: WrongTargetPath(), "the target is not d x_t/dt"),
    ("backbone", "batch_leak"): (lambda spec: BatchNormalisedNet(spec), "violates 'items are independent'"),
    ("backbone", "unused_parameter"): (lambda spec: BatchNormalisedNet(spec, leak=False, unused=True),
                                       "violates 'gradients reach every parameter': no gradient reaches unused"),
    ("backbone", "ignores_time"): (lambda spec: BatchNormalisedNet(spec, leak=False, use_t=False),
                                   "violates 'time conditions the output'"),
    ("objective", "tensor_logs"): (lambda: TensorLoggingObjective(), "violates 'logged values are floats'"),
    ("objective", "misbinned"): (lambda: MisbinnedObjective(), "violates 'logged values are floats'"),
    ("objective", "forgetful"): (lambda: ForgetfulObjective(), "violates 'same seed, same loss'"),
    ("objective", "global_noise"): (lambda: GlobalNoiseObjective(), "violates 'per-example draws'"),
    ("data", "global_rng"): (lambda: GlobalRNGData(), r"violates 'deterministic in \(seed, step, rank\)'"),
    ("data", "rank_blind"): (lambda: RankBlindData(), "violates 'ranks partition the global batch'"),
    ("metric", "offset"): (lambda: OffsetMetric(), "violates 'a set against itself is at the best value'"),
    ("metric", "sticky"): (lambda: StickyMetric(), "violates 'reset clears the state'"),
    ("launcher", "silent"): (lambda: SilentLauncher(), "violates 'reports failures'"),
}


class BrokenPlugin:
    """A plugin (as a third party would write one) registering one broken component of each kind."""

    FLOWFORGE_API = registry.API_VERSION

    @hookimpl
    def flowforge_register(self, register):
        for (kind, name), (factory, _) in BROKEN.items():
            register(kind, name, factory, None, doc="deliberately broken (tests/conformance/test_conformance.py)")


def check_built(kind: str, name: str) -> None:
    """Build through the registry, as an experiment would, and run the kit of `kind`."""
    if kind == "solver":
        solver_kit.check_solver(lambda method, steps: build(kind, name), {"euler": (1, 1)}, steps=(4,))
    elif kind == "scheduler":  # the explicit-value checks: hypothesis would spend seconds shrinking the failure
        t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        scheduler_kit.check_boundaries(build(kind, name))
        scheduler_kit.check_derivatives(build(kind, name), t)
    elif kind == "path":
        g = torch.Generator().manual_seed(0)
        x_0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
        x_1 = torch.randn(3, 2, generator=g, dtype=torch.float64)
        t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        path_kit.check_sample_at(build(kind, name), x_0, x_1, t)
        path_kit.check_target_is_velocity_at(build(kind, name), x_0, x_1, t)
    elif kind == "backbone":
        backbone_kit.check_backbone(build(kind, name, spec=SPEC_2D), SPEC_2D, name=name)
    elif kind == "objective":
        objective_kit.check_objective(build(kind, name), mlp(SPEC_2D), batch_2d(), name=name, sampling=False)
    elif kind == "data":
        data_kit.check_data_source(build(kind, name), name=name)
    elif kind == "metric":
        metric_kit.check_sample_metric(build(kind, name), _samples_2d()[1], name=name, best_value=0.0)
    elif kind == "launcher":
        launcher_kit.check_launcher(build(kind, name), name=name)


@pytest.fixture(scope="module")
def broken_plugin():
    with registry.temporary_plugin(BrokenPlugin(), name="broken_conformance", distribution="flowforge-broken"):
        yield


@pytest.mark.parametrize("kind,name", sorted(BROKEN), ids=[f"{k}-{n}" for k, n in sorted(BROKEN)])
def test_broken_plugin_fails_the_kit_naming_the_invariant(broken_plugin, kind, name):
    message = BROKEN[(kind, name)][1]
    with pytest.raises(AssertionError, match=message):
        check_built(kind, name)
