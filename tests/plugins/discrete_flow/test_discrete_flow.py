"""Discrete flow matching: the mixture path, its velocities, the generalized KL loss, the Euler solver."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import registry
from core.interfaces import DataSpec
from core.testing.objectives import check_objective
from plugins.discrete_flow.objective import generalized_kl
from plugins.discrete_flow.path import MixtureDiscretePath, categorical
from plugins.discrete_flow.solver import DiscreteEulerConfig, DiscreteEulerSolver
from registry import ConfigError

SETTINGS = settings(max_examples=30, deadline=None, database=None)


def make_path(source: str = "uniform", data_vocab: int = 5, n: float = 1.0) -> MixtureDiscretePath:
    scheduler = registry.build("scheduler", {"plugin": "polynomial", "n": n})
    mask = data_vocab if source == "mask" else None
    return MixtureDiscretePath(scheduler, data_vocab + (mask is not None), source, mask)


def random_logits(shape, vocab, seed):
    return torch.randn(*shape, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


sources = st.sampled_from(["uniform", "mask"])
exponents = st.sampled_from([1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- the path
@SETTINGS
@given(source=sources, n=exponents, vocab=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
def test_path_ends_are_source_and_data(source, n, vocab, seed):
    path = make_path(source, vocab, n)
    g = torch.Generator().manual_seed(seed)
    x_1 = torch.randint(vocab, (7, 3), generator=g)
    x_0 = path.sample_source(x_1.shape, generator=g)
    assert torch.equal(path.sample(x_0, x_1, torch.zeros(7), generator=g).x_t, x_0)
    assert torch.equal(path.sample(x_0, x_1, torch.ones(7), generator=g).x_t, x_1)


@SETTINGS
@given(source=sources, n=exponents, t=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_fraction_of_data_tokens_matches_kappa(source, n, t, seed):
    """Each token takes its data value with probability kappa_t: the fraction is within 5 standard errors."""
    vocab, count = 6, 20000
    path = make_path(source, vocab, n)
    g = torch.Generator().manual_seed(seed)
    x_1 = torch.randint(vocab, (count,), generator=g)
    x_0 = path.sample_source(x_1.shape, generator=g)
    from_data = path.sample(x_0, x_1, torch.full((count,), t), generator=g).x_t == x_1
    # a source token equals the data token by chance with probability 1/V (uniform source)
    kappa = t**n
    chance = 1.0 / vocab if source == "uniform" else 0.0
    p = kappa + (1 - kappa) * chance
    stderr = math.sqrt(p * (1 - p) / count)
    assert abs(from_data.float().mean().item() - p) <= 5 * stderr + 1e-9


def test_sources():
    g = torch.Generator().manual_seed(0)
    masked = make_path("mask", 5)
    assert torch.all(masked.sample_source((4, 3), generator=g) == 5)
    assert torch.equal(masked.source_probs(), F.one_hot(torch.tensor(5), 6).float())
    uniform = make_path("uniform", 5)
    draws = uniform.sample_source((20000,), generator=g)
    assert draws.min() == 0 and draws.max() == 4
    assert torch.allclose(torch.bincount(draws).float() / 20000, torch.full((5,), 0.2), atol=0.02)
    # a vocabulary with a mask token but a uniform source never draws the mask
    path = MixtureDiscretePath(uniform.scheduler, 6, "uniform", mask_token=5)
    assert path.sample_source((5000,), generator=g).max() == 4
    assert path.source_probs()[5] == 0


# --------------------------------------------------------------------------- posteriors and velocities
@SETTINGS
@given(source=sources, t=st.floats(0.0, 0.999), seed=st.integers(0, 2**31 - 1),
       beta=st.floats(0.0, 5.0))
def test_velocity_rows_sum_to_zero_and_rates_are_non_negative(source, t, seed, beta):
    vocab = 7
    path = make_path(source, vocab, 2.0)
    g = torch.Generator().manual_seed(seed)
    x_t = path.sample(path.sample_source((4, 3), generator=g), torch.randint(vocab, (4, 3), generator=g),
                      torch.rand(4, generator=g, dtype=torch.float64), generator=g).x_t
    posterior = path.posterior(random_logits((4, 3), path.vocab_size, seed), x_t)
    times = torch.full((4,), t, dtype=torch.float64)
    offdiag = ~F.one_hot(x_t, path.vocab_size).bool()
    for u in (path.velocity(posterior, x_t, times), path.divergence_free(posterior, x_t, times),
              path.velocity(posterior, x_t, times) + beta * path.divergence_free(posterior, x_t, times)):
        scale = u.abs().amax().item() + 1.0
        assert u.sum(-1).abs().max().item() <= 1e-9 * scale
        assert (u[offdiag] >= 0).all()


def test_posterior_never_predicts_the_mask_and_carries_revealed_tokens_over():
    path = make_path("mask", 4)
    x_t = torch.tensor([[4, 2, 4, 0]])
    posterior = path.posterior(torch.zeros(1, 4, 5), x_t)
    assert torch.all(posterior[..., 4] == 0)
    assert torch.allclose(posterior.sum(-1), torch.ones(1, 4))
    assert torch.equal(posterior[0, 1], F.one_hot(torch.tensor(2), 5).float())
    assert torch.allclose(posterior[0, 0], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))


def test_path_config_errors():
    spec = DataSpec(shape=(2,), kind="discrete", vocab_size=8)
    scheduler = registry.build("scheduler", {"plugin": "cond_ot"})
    with pytest.raises(ConfigError, match="mask token"):
        registry.build("path", {"plugin": "mixture_discrete", "source": "mask"}, spec=spec, scheduler=scheduler)
    with pytest.raises(ConfigError, match="scheduler"):
        registry.build("path", {"plugin": "mixture_discrete"}, spec=spec)
    with pytest.raises(ConfigError, match="convex"):
        registry.build("path", {"plugin": "mixture_discrete"}, spec=spec,
                       scheduler=registry.build("scheduler", {"plugin": "cosine"}))
    with pytest.raises(ConfigError, match="discrete"):
        registry.build("path", {"plugin": "mixture_discrete"}, spec=DataSpec(shape=(2,)), scheduler=scheduler)


# --------------------------------------------------------------------------- the generalized KL
@SETTINGS
@given(source=sources, t=st.floats(0.0, 0.99), seed=st.integers(0, 2**31 - 1))
def test_generalized_kl_is_non_negative_and_zero_exactly_at_the_true_posterior(source, t, seed):
    vocab = 6
    path = make_path(source, vocab, 1.0)
    g = torch.Generator().manual_seed(seed)
    x_1 = torch.randint(vocab, (5, 4), generator=g)
    x_t = path.sample(path.sample_source(x_1.shape, generator=g), x_1, torch.full((5,), t), generator=g).x_t
    coef = path.jump_coefficient(torch.full((5,), t))
    assert (coef > 0).all()
    log_p = path.log_posterior(random_logits((5, 4), path.vocab_size, seed), x_t)
    model = generalized_kl(log_p, x_1, x_t, coef)
    assert (model >= 0).all()
    # zero exactly where the posterior is the one-hot of x_1 (with the mask source: revealed positions)
    exact = (log_p.exp() - F.one_hot(x_1, path.vocab_size)).abs().amax(-1) == 0
    assert torch.equal(model == 0, exact)
    # the conditional posterior given x_1 is the one-hot of x_1: the loss is exactly zero there
    truth = generalized_kl(torch.log(F.one_hot(x_1, path.vocab_size).double()), x_1, x_t, coef)
    assert torch.equal(truth, torch.zeros_like(truth))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), t=st.floats(0.05, 0.95), source=sources)
def test_expected_generalized_kl_is_minimised_by_the_true_marginal_posterior(seed, t, source):
    """For one token with data law q, E_{x_1 | x_t}[loss] is smallest at the exact posterior (a Bregman divergence)."""
    vocab = 5
    path = make_path(source, vocab, 1.0)
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, 0)
    p0 = path.source_probs(dtype=torch.float64)[:vocab] if source == "uniform" else None
    states = range(vocab) if source == "uniform" else [vocab]
    coef = path.jump_coefficient(torch.tensor([t]))
    for z in states:
        # the exact posterior p(x_1 | x_t = z) for the one-token mixture path
        if source == "uniform":
            joint = q * (t * F.one_hot(torch.tensor(z), vocab).double() + (1 - t) * p0[z])
        else:
            joint = q * (1 - t)
        exact = joint / joint.sum()

        def expected_loss(log_p):
            x_1 = torch.arange(vocab)
            x_t = torch.full((vocab,), z)
            per = generalized_kl(log_p.expand(vocab, 1, -1), x_1[:, None], x_t[:, None], coef.expand(vocab))
            return (exact * per[:, 0]).sum().item()

        log_exact = torch.log(torch.cat([exact, torch.zeros(path.vocab_size - vocab, dtype=torch.float64)]))
        best = expected_loss(log_exact[None])
        other = torch.log_softmax(torch.randn(path.vocab_size, generator=g, dtype=torch.float64), 0)
        if source == "mask":
            other = path.log_posterior(other[None], torch.tensor([z]))[0]
        assert expected_loss(other[None]) >= best - 1e-12


# --------------------------------------------------------------------------- the solver
class Oracle:
    """Logits of a posterior that is the one-hot of a fixed point; counts its calls."""

    def __init__(self, point: torch.Tensor, vocab: int):
        self.logits = torch.log(F.one_hot(point, vocab).double()).float()
        self.calls = 0

    def __call__(self, x, t, y=None):
        assert t.shape == (x.shape[0],)
        self.calls += 1
        return self.logits.expand(x.shape[0], *self.logits.shape)


@SETTINGS
@given(source=sources, steps=st.integers(1, 30), div_free=st.sampled_from([0.0, 1.5, "sym"]),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**31 - 1))
def test_solver_with_an_oracle_returns_the_one_data_point(source, steps, div_free, dtype, seed):
    vocab = 9
    path = make_path(source, vocab, 2.0)
    point = torch.randint(vocab, (2, 3), generator=torch.Generator().manual_seed(seed))
    oracle = Oracle(point, path.vocab_size)
    solver = DiscreteEulerSolver(DiscreteEulerConfig(steps=steps, div_free=div_free, categorical_dtype=dtype), path)
    g = torch.Generator().manual_seed(seed)
    out = solver.sample(oracle, path.sample_source((16, 2, 3), generator=g), generator=g, intermediates=True)
    assert torch.equal(out.x, point.expand(16, 2, 3))
    assert out.nfe == steps == oracle.calls
    assert out.trajectory.shape == (steps + 1, 16, 2, 3) and out.times.shape == (steps + 1,)
    assert torch.equal(out.trajectory[-1], out.x)


def test_solver_is_a_function_of_the_generator():
    path = make_path("uniform", 6)
    solver = DiscreteEulerSolver(DiscreteEulerConfig(steps=8, div_free="sym"), path)

    def model(x, t, y=None):
        return torch.sin(x[..., None] * 1.3 + torch.arange(6.0) + 3 * t[:, None, None])

    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        g = torch.Generator().manual_seed(7)
        runs.append(solver.sample(model, path.sample_source((50, 4), generator=g), generator=g).x)
    assert torch.equal(*runs)


def transition_matrix(solver: DiscreteEulerSolver, posterior_of, t: float, h: float, beta: float) -> torch.Tensor:
    """The one-step kernel K[z, x] of the solver for a single token (float64)."""
    v = solver.path.vocab_size
    z = torch.arange(v)
    rates = solver.jump_rates(posterior_of(z, t), z, torch.full((v,), t, dtype=torch.float64), beta)
    total = rates.sum(-1, keepdim=True)
    jump = -torch.expm1(-h * total)
    return torch.where(total > 0, jump * rates / total.clamp_min(1e-300), 0.0) + (1 - jump) * torch.eye(v)


@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
def test_divergence_free_term_keeps_the_marginals_of_a_uniform_source(beta):
    """With the exact posterior of a one-token data law q, the Euler kernels (with any beta) map
    p_t to a distribution (non-negative, normalised) that stays within O(h) of p_t = (1-k) p_0 + k q."""
    vocab, steps = 6, 400
    path = make_path("uniform", vocab, 1.0)
    solver = DiscreteEulerSolver(DiscreteEulerConfig(steps=steps), path)
    q = torch.softmax(torch.arange(vocab, dtype=torch.float64) * 0.7 - 1.0, 0)
    p0 = path.source_probs(dtype=torch.float64)

    def posterior_of(z, t):
        joint = q[None] * (t * F.one_hot(z, vocab).double() + (1 - t) * p0[z][:, None])
        return joint / joint.sum(-1, keepdim=True)

    p = p0.clone()
    grid = solver.time_grid()
    worst = 0.0
    for k in range(steps - 1):
        t, h = float(grid[k]), float(grid[k + 1] - grid[k])
        p = p @ transition_matrix(solver, posterior_of, t, h, beta)
        assert (p >= 0).all() and abs(p.sum().item() - 1.0) < 1e-12
        exact = (1 - grid[k + 1]) * p0 + grid[k + 1] * q
        worst = max(worst, (p - exact).abs().max().item())
    assert worst < 0.02, worst


@SETTINGS
@given(source=sources, div_free=st.sampled_from([0.0, 2.0, "sym"]), seed=st.integers(0, 2**31 - 1),
       frac=st.floats(0.0, 1.0))
def test_given_positions_are_never_changed(source, div_free, seed, frac):
    vocab = 7
    path = make_path(source, vocab, 1.0)
    g = torch.Generator().manual_seed(seed)
    x_1 = torch.randint(vocab, (8, 10), generator=g)
    known = torch.rand(8, 10, generator=g) < frac
    x_init = torch.where(known, x_1, path.sample_source(x_1.shape, generator=g))

    def model(x, t, y=None):  # an arbitrary model that would happily change every token
        return random_logits(x.shape, path.vocab_size, int(1000 * t[0].item())).float()

    solver = DiscreteEulerSolver(DiscreteEulerConfig(steps=12, div_free=div_free), path)
    out = solver.sample(model, x_init, generator=g, known=known, intermediates=True)
    assert torch.equal(out.trajectory[:, known], x_1[known].expand(13, -1))
    assert (out.x < vocab).all()


def test_categorical_never_draws_a_token_of_weight_zero():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).expand(20000, 5)
    for dtype in (torch.float32, torch.float64):
        draws = categorical(w, g, dtype)
        counts = torch.bincount(draws, minlength=5)
        assert counts[0] == counts[2] == counts[4] == 0
        assert abs(counts[3].item() / 20000 - 0.75) < 0.02


def test_solver_config_errors():
    spec = DataSpec(shape=(2,), kind="discrete", vocab_size=8)
    with pytest.raises(ConfigError, match="sym"):
        registry.resolved("solver", {"plugin": "discrete_euler", "div_free": "cosine"})
    with pytest.raises(ConfigError, match="mixture_discrete"):
        registry.build("solver", {"plugin": "discrete_euler"}, spec=spec, path=None)
    resolved = registry.resolved("solver", {"plugin": "discrete_euler", "div_free": "sym"})
    assert resolved["div_free"] == "sym" and resolved["sym_scale"] == 12.0
    beta = DiscreteEulerConfig(div_free="sym").beta()
    assert beta(0.5) == pytest.approx(12 * 0.25 * 0.5**0.25)


# --------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("loss", ["generalized_kl", "cross_entropy"])
@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_objective_conforms(loss, source):
    spec = DataSpec(shape=(3,), kind="discrete", vocab_size=6, num_classes=2,
                    extra={"mask_token": 5} if source == "mask" else {})
    scheduler = registry.build("scheduler", {"plugin": "polynomial", "n": 2.0})
    path = registry.build("path", {"plugin": "mixture_discrete", "source": source}, spec=spec, scheduler=scheduler)
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 1}, spec=spec)
    batch = {"x": torch.randint(5, (8, 3)), "y": torch.randint(2, (8,))}
    check_objective(lambda: registry.build("objective", {"plugin": "discrete_fm", "loss": loss, "label_dropout": 0.2},
                                           spec=spec, path=path), {"model": model}, batch, name="discrete_fm")


def test_objective_leaves_known_positions_out_of_the_loss():
    spec = DataSpec(shape=(4,), kind="discrete", vocab_size=5)
    path = registry.build("path", {"plugin": "mixture_discrete"}, spec=spec,
                          scheduler=registry.build("scheduler", {"plugin": "cond_ot"}))
    objective = registry.build("objective", {"plugin": "discrete_fm"}, spec=spec, path=path)
    seen = []

    def model(x, t, y=None):
        seen.append(x.clone())
        logits = torch.zeros(*x.shape, 5, requires_grad=True)
        return logits

    x = torch.randint(5, (64, 4))
    known = torch.zeros(64, 4, dtype=torch.bool)
    known[:, :2] = True
    objective.loss({"model": model}, {"x": x, "known": known}, 0)
    assert torch.equal(seen[0][:, :2], x[:, :2])
    all_known = objective.loss({"model": model}, {"x": x, "known": torch.ones_like(known)}, 0)[0]
    assert all_known.item() == 0.0


def test_objective_config_errors():
    with pytest.raises(ConfigError, match="t_max"):
        registry.resolved("objective", {"plugin": "discrete_fm", "t_max": 1.0})
    assert registry.resolved("objective", {"plugin": "discrete_fm", "loss": "cross_entropy", "t_max": 1.0})["t_max"] == 1.0
