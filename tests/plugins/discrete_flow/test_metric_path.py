"""The metric-induced discrete path (Shaul et al. 2024): closed forms, the Kolmogorov equation,
the kinetic-optimal velocity, the Euler solver on any time grid, the ELBO and the objective.

The references here are written from the paper's equations, not from flowforge's code:
``p_t(x | x_1) = exp(-beta_t d(x, x_1)) / Z``, ``beta_t = c (t / (1 - t))^a``, and the kinetic-optimal
velocity ``u(x, z) = [p'(x) p(z) - p(x) p'(z)]_+ / p(z)`` of a path ``p`` (``p'`` by finite differences).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import registry
from core.interfaces import DataSpec
from core.testing.objectives import check_objective
from plugins.discrete_flow.metric_path import MetricInducedPath, token_distances
from plugins.discrete_flow.metrics import DiscreteELBO, ELBOConfig
from plugins.discrete_flow.path import MixtureDiscretePath, rate_divergence
from plugins.discrete_flow.solver import DiscreteEulerConfig, DiscreteEulerSolver
from registry import ConfigError

SETTINGS = settings(max_examples=25, deadline=None, database=None)
metrics = st.sampled_from(["absolute", "squared", "hamming"])
times = st.floats(0.02, 0.97)
scales = st.sampled_from([0.3, 1.0, 4.0])
powers = st.sampled_from([0.5, 1.0, 2.0])


def reference_probs(d: torch.Tensor, x_1: int, t: float, c: float, a: float) -> torch.Tensor:
    """``p_t(. | x_1)`` (V,) in float64 from the paper's formula."""
    beta = c * (t / (1 - t)) ** a
    w = torch.exp(-beta * d[:, x_1])
    return w / w.sum()


def conditional_rates(path: MetricInducedPath, x_1: int, t: float) -> torch.Tensor:
    """``U[z, x] = u_t(x, z | x_1)`` for every state z (rows: the path's velocity with the one-hot posterior)."""
    v = path.vocab_size
    z = torch.arange(v)
    post = F.one_hot(torch.full((v,), x_1), v).double()
    return path.velocity(post, z, torch.full((v,), t, dtype=torch.float64))


# --------------------------------------------------------------------------- closed forms
@SETTINGS
@given(vocab=st.integers(2, 9), t=times, c=scales, a=powers, seed=st.integers(0, 2**31 - 1))
def test_hamming_path_is_the_mixture_path_with_a_uniform_source(vocab, t, c, a, seed):
    """d = [x != x']: p_t = kappa delta_{x_1} + (1 - kappa) / V with kappa = (V / Z - 1) / (V - 1),
    Z = 1 + (V - 1) e^{-beta} (so 1 - kappa = V e^{-beta} / Z), and the velocity is kappa' / (1 - kappa) (p_{1|t} - delta_z)."""
    path = MetricInducedPath(token_distances("hamming", vocab), c, a)
    beta = c * (t / (1 - t)) ** a
    assume(beta < 500)  # e^{-beta} underflows beyond: the closed form's 0 / 0
    d_beta = c * a * t ** (a - 1) / (1 - t) ** (a + 1)
    z_t = 1 + (vocab - 1) * math.exp(-beta)
    one_minus_kappa = vocab * math.exp(-beta) / z_t  # = 1 - (V / Z - 1) / (V - 1), without the cancellation
    kappa = 1 - one_minus_kappa
    d_kappa = vocab * math.exp(-beta) * d_beta / z_t**2
    x_1 = torch.randint(vocab, (4, 3), generator=torch.Generator().manual_seed(seed))
    tt = torch.full((4,), t, dtype=torch.float64)
    mixture = kappa * F.one_hot(x_1, vocab).double() + (1 - kappa) / vocab
    torch.testing.assert_close(path.conditional_probs(x_1, tt), mixture, rtol=1e-10, atol=1e-12)
    posterior = torch.softmax(torch.randn(4, 3, vocab, generator=torch.Generator().manual_seed(seed + 1),
                                          dtype=torch.float64), -1)
    z = torch.randint(vocab, (4, 3), generator=torch.Generator().manual_seed(seed + 2))
    expected = d_kappa / one_minus_kappa * (posterior - F.one_hot(z, vocab).double())
    torch.testing.assert_close(path.velocity(posterior, z, tt), expected, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(metric=metrics, vocab=st.integers(2, 8), t=times, c=scales, a=powers, seed=st.integers(0, 2**31 - 1))
def test_conditional_path_is_the_boltzmann_law_of_the_distance(metric, vocab, t, c, a, seed):
    d = token_distances(metric, vocab)
    path = MetricInducedPath(d, c, a)
    x_1 = torch.randint(vocab, (6,), generator=torch.Generator().manual_seed(seed))
    probs = path.conditional_probs(x_1, torch.full((6,), t, dtype=torch.float64))
    for i in range(6):
        torch.testing.assert_close(probs[i], reference_probs(d, int(x_1[i]), t, c, a), rtol=1e-10, atol=1e-13)


@SETTINGS
@given(metric=metrics, vocab=st.integers(2, 8), t=times, c=scales, a=powers, x_1=st.integers(0, 7))
def test_conditional_velocity_is_kinetic_optimal_and_solves_the_kolmogorov_equation(metric, vocab, t, c, a, x_1):
    """Rates are the paper's u(x, z) = [p'(x) p(z) - p(x) p'(z)]_+ / p(z) (p' by central differences),
    non-negative off the diagonal, rows sum to zero, and p' = p U (the Kolmogorov forward equation)."""
    x_1 = x_1 % vocab
    d = token_distances(metric, vocab)
    assume(c * (t / (1 - t)) ** a * d.max().item() <= 60)  # beyond, p_t(x | x_1) underflows: differences say nothing
    path = MetricInducedPath(d, c, a)
    h = 1e-6 * min(t, 1 - t)
    p = reference_probs(d, x_1, t, c, a)
    dp = (reference_probs(d, x_1, t + h, c, a) - reference_probs(d, x_1, t - h, c, a)) / (2 * h)
    rates = conditional_rates(path, x_1, t)
    scale = dp.abs().max().item() + 1e-4 / h  # 1e-4 / h * 1e-6: the rounding of the differences (1e-16 / h)
    flux = (dp[None, :] * p[:, None] - p[None, :] * dp[:, None]).clamp_min(0)  # [z, x]: u(x, z) p(z), optimal
    off = ~torch.eye(vocab, dtype=torch.bool)
    assert (rates[off] >= 0).all()
    torch.testing.assert_close(rates.sum(-1), torch.zeros(vocab, dtype=torch.float64), atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close((rates * p[:, None])[off], flux[off], atol=1e-6 * scale, rtol=1e-6)
    torch.testing.assert_close(p @ rates, dp, atol=1e-6 * scale, rtol=1e-6)
    closer = d[:, x_1][None, :] < d[:, x_1][:, None]  # [z, x]: x is closer to x_1 than z
    assert (rates[off & ~closer] == 0).all()


@SETTINGS
@given(metric=metrics, vocab=st.integers(2, 7), t=times, c=scales, a=powers, seed=st.integers(0, 2**31 - 1))
def test_marginal_velocity_with_the_exact_posterior_solves_the_marginal_kolmogorov_equation(metric, vocab, t, c, a,
                                                                                            seed):
    """q a data law on V tokens, p_t = sum_x1 q(x_1) p_t(. | x_1), posterior(x_1 | z) = q(x_1) p_t(z | x_1) / p_t(z):
    the marginal velocity u_t(., z) built from it gives dp_t/dt = p_t U."""
    d = token_distances(metric, vocab)
    assume(c * (t / (1 - t)) ** a * d.max().item() <= 60)
    path = MetricInducedPath(d, c, a)
    q = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5, 0)

    def marginal(s):
        return sum(q[k] * reference_probs(d, k, s, c, a) for k in range(vocab))

    h = 1e-6 * min(t, 1 - t)
    p, dp = marginal(t), (marginal(t + h) - marginal(t - h)) / (2 * h)
    joint = torch.stack([q[k] * reference_probs(d, k, t, c, a) for k in range(vocab)], 1)  # [z, x_1]
    posterior = joint / joint.sum(1, keepdim=True)
    rates = path.velocity(posterior, torch.arange(vocab), torch.full((vocab,), t, dtype=torch.float64))
    scale = dp.abs().max().item() + 1e-4 / h  # see the conditional test
    torch.testing.assert_close(p @ rates, dp, atol=1e-6 * scale, rtol=1e-6)


@SETTINGS
@given(metric=metrics, vocab=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
def test_path_ends_are_uniform_and_the_data(metric, vocab, seed):
    path = MetricInducedPath(token_distances(metric, vocab), 2.0, 1.0)
    g = torch.Generator().manual_seed(seed)
    x_1 = torch.randint(vocab, (4000,), generator=g)
    x_0 = path.sample_source((4000,), generator=g)
    at_one = path.sample(x_0, x_1, torch.ones(4000), generator=g).x_t
    assert torch.equal(at_one, x_1)
    at_zero = path.sample(x_0, x_1, torch.zeros(4000), generator=g).x_t
    freq = torch.bincount(at_zero, minlength=vocab).double() / 4000
    assert (freq - 1 / vocab).abs().max() < 4 * math.sqrt(1 / vocab / 4000)  # 4 sigma of a uniform count
    torch.testing.assert_close(path.source_probs(dtype=torch.float64), torch.full((vocab,), 1 / vocab,
                                                                                  dtype=torch.float64))


def test_samples_follow_the_conditional_law_and_per_example_draws():
    from core import rng

    path = MetricInducedPath(token_distances("absolute", 6), 1.0, 1.0)
    n = 20000
    x_1 = torch.full((n, 1), 2)
    t = torch.full((n,), 0.6)
    x_t = path.sample(None, x_1, t, generator=torch.Generator().manual_seed(0)).x_t[:, 0]
    freq = torch.bincount(x_t, minlength=6).double() / n
    expected = reference_probs(token_distances("absolute", 6), 2, 0.6, 1.0, 1.0)
    assert (freq - expected).abs().max() < 4 * math.sqrt(0.25 / n)
    batch = {"x": x_1[:8], "seeds": torch.arange(8)}
    draws = [path.sample(None, x_1[:8], t[:8], draw=rng.for_batch(batch)).x_t for _ in range(2)]
    assert torch.equal(*draws)


# --------------------------------------------------------------------------- the solver
def propagate(path: MetricInducedPath, q: torch.Tensor, config: DiscreteEulerConfig) -> float:
    """Push p_0 through the solver's one-step kernels with the exact posterior of q (one token);
    return the largest gap to the exact marginal p_t over the grid, the last (posterior draw) step included."""
    solver = DiscreteEulerSolver(config, path)
    v = path.vocab_size
    d = path.distances
    z = torch.arange(v)
    grid = solver.time_grid()
    p = path.source_probs(dtype=torch.float64)
    worst = 0.0
    for k in range(len(grid) - 1):
        t = float(grid[k])
        joint = torch.stack([q[j] * reference_probs(d, j, t, path.beta_scale, path.beta_power) for j in range(v)], 1)
        posterior = joint / joint.sum(1, keepdim=True)
        if k == len(grid) - 2:
            p = p @ posterior
            exact = q
        else:
            h = float(grid[k + 1] - grid[k])
            rates = solver.jump_rates(posterior, z, torch.full((v,), t, dtype=torch.float64))
            total = rates.sum(-1, keepdim=True)
            jump = -torch.expm1(-h * total)
            kernel = torch.where(total > 0, jump * rates / total.clamp_min(1e-300), 0.0) + (1 - jump) * torch.eye(v)
            p = p @ kernel
            s = float(grid[k + 1])
            exact = sum(q[j] * reference_probs(d, j, s, path.beta_scale, path.beta_power) for j in range(v))
        assert (p >= 0).all() and abs(p.sum().item() - 1) < 1e-10
        worst = max(worst, (p - exact).abs().max().item())
    return worst


def test_euler_solver_follows_the_marginals_at_first_order_on_any_time_grid(metric="squared"):
    """With the exact posterior the solver's law stays within O(h) of p_t: halving the steps of a
    uniform grid and of a grid crowded towards t = 1 (t_k = 1 - (1 - k/N)^2) roughly doubles the gap."""
    vocab = 7
    path = MetricInducedPath(token_distances(metric, vocab), 1.5, 1.0)
    q = torch.softmax(torch.arange(vocab, dtype=torch.float64) * 0.8 - 2.0, 0)
    for grid in (lambda n: None, lambda n: [1 - (1 - k / n) ** 2 for k in range(n + 1)]):
        gaps = [propagate(path, q, DiscreteEulerConfig(steps=n, times=grid(n))) for n in (100, 200)]
        assert gaps[1] < 0.05
        assert 1.6 < gaps[0] / gaps[1] < 2.4, gaps


def test_solver_draws_the_data_with_an_oracle_and_refuses_the_divergence_free_term():
    vocab = 9
    path = MetricInducedPath(token_distances("absolute", vocab), 1.0, 1.0)
    point = torch.tensor([[3, 7, 0]])

    def oracle(x, t, y=None):
        return torch.where(F.one_hot(point, vocab).bool(), 0.0, -1e9).expand(x.shape[0], 3, vocab)

    solver = registry.build("solver", {"plugin": "discrete_euler", "steps": 12, "categorical_dtype": "float64"},
                            path=path)
    g = torch.Generator().manual_seed(0)
    out = solver.sample(oracle, path.sample_source((32, 3), generator=g), generator=g)
    assert torch.equal(out.x, point.expand(32, 3)) and out.nfe == 12
    with pytest.raises(ConfigError, match="divergence-free"):
        registry.build("solver", {"plugin": "discrete_euler", "div_free": "sym"}, path=path)


# --------------------------------------------------------------------------- losses and the ELBO
@SETTINGS
@given(t=times, seed=st.integers(0, 2**31 - 1), source=st.sampled_from(["uniform", "mask"]))
def test_rate_divergence_of_the_mixture_rates_is_the_mixture_closed_form(t, seed, source):
    """The generic generalized KL between the mixture path's conditional and model rates equals its
    closed form lambda (delta - p(x_t) - (1 - delta) log p(x_1))."""
    vocab = 6
    mask = vocab - 1 if source == "mask" else None
    path = MixtureDiscretePath(registry.build("scheduler", {"plugin": "polynomial", "n": 2.0}), vocab, source, mask)
    g = torch.Generator().manual_seed(seed)
    x_1 = torch.randint(path.data_vocab, (5, 4), generator=g)
    x_0 = path.sample_source((5, 4), generator=g)
    tt = torch.full((5,), t, dtype=torch.float64)
    x_t = path.sample(x_0, x_1, tt, generator=g).x_t
    log_p = path.log_posterior(torch.randn(5, 4, vocab, generator=g, dtype=torch.float64), x_t)
    off = ~F.one_hot(x_t, vocab).bool()
    u_model = path.velocity(log_p.exp(), x_t, tt) * off
    u_ref = path.velocity(F.one_hot(x_1, vocab).double(), x_t, tt) * off
    torch.testing.assert_close(rate_divergence(u_ref, u_model), path.generalized_kl(log_p, x_1, x_t, tt),
                               rtol=1e-9, atol=1e-12)


@SETTINGS
@given(metric=metrics, t=times, seed=st.integers(0, 2**31 - 1))
def test_metric_generalized_kl_is_non_negative_and_zero_at_the_data(metric, t, seed):
    vocab = 7
    path = MetricInducedPath(token_distances(metric, vocab), 1.0, 1.0)
    g = torch.Generator().manual_seed(seed)
    x_1 = torch.randint(vocab, (5, 4), generator=g)
    tt = torch.full((5,), t, dtype=torch.float64)
    x_t = path.sample(None, x_1, tt, generator=g).x_t
    log_p = path.log_posterior(torch.randn(5, 4, vocab, generator=g, dtype=torch.float64) * 2, x_t)
    assert (path.generalized_kl(log_p, x_1, x_t, tt) >= -1e-12).all()
    exact = torch.log(F.one_hot(x_1, vocab).double().clamp_min(1e-300))
    torch.testing.assert_close(path.generalized_kl(exact, x_1, x_t, tt), torch.zeros(5, 4, dtype=torch.float64),
                               atol=1e-9, rtol=0)


class ExactPosterior(torch.nn.Module):
    """The exact posterior of a one-position data law q on a metric path, as logits."""

    def __init__(self, path: MetricInducedPath, q: torch.Tensor):
        super().__init__()
        self.path, self.q = path, q
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        d, v = self.path.distances, self.path.vocab_size
        beta = self.path.beta_scale * (t.double() / (1 - t.double()).clamp_min(1e-12)) ** self.path.beta_power
        log_joint = self.q.log()[None, :] - beta[:, None] * d[x[:, 0]]  # [b, x_1]: q(x_1) exp(-beta d(z, x_1))
        log_z = torch.logsumexp(-beta[:, None, None] * d[None], dim=1)  # [b, x_1]: log Z_t(x_1)
        return (log_joint - log_z).float()[:, None, :]


class OneToken:
    def __init__(self, q: torch.Tensor):
        self.q, self.spec = q, DataSpec(shape=(1,), kind="discrete", vocab_size=len(q))

    def reference(self, n, generator):
        return {"x": torch.multinomial(self.q, n, replacement=True, generator=generator)[:, None]}


def test_elbo_of_the_exact_posterior_bounds_the_entropy():
    """One position, absolute metric: the bound of the exact model is finite and at least H(q);
    a uniform model scores worse."""
    q = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64)
    path = registry.build("path", {"plugin": "metric_discrete", "metric": "absolute", "beta_scale": 2.0,
                                   "add_likelihood": False}, spec=DataSpec(shape=(1,), kind="discrete", vocab_size=5))
    metric = DiscreteELBO(ELBOConfig(num_examples=8000, times=16, batch_size=8000), path)
    out = metric.evaluate(ExactPosterior(path, q), OneToken(q), torch.Generator().manual_seed(0))
    entropy = -(q * q.log()).sum().item()
    slack = 4 * out["bits_per_token_stderr"] * math.log(2)
    assert math.isfinite(out["nats_per_token"]) and out["nats_per_token"] >= entropy - slack

    class Uniform(ExactPosterior):
        def forward(self, x, t, y=None):
            return torch.zeros(x.shape[0], 1, 5)

    worse = metric.evaluate(Uniform(path, q), OneToken(q), torch.Generator().manual_seed(0))
    assert worse["nats_per_token"] > out["nats_per_token"] + slack


@SETTINGS
@given(metric=metrics, t=times, c=scales, seed=st.integers(0, 2**31 - 1))
def test_added_likelihood_turns_the_data_law_into_the_exact_posterior(metric, t, c, seed):
    """One position with data law q: with add_likelihood, logits log q give Bayes' posterior
    q(x_1) p_t(z | x_1) / sum_k q(k) p_t(z | k) (p_t from the paper's formula)."""
    vocab = 6
    d = token_distances(metric, vocab)
    assume(c * t / (1 - t) <= 30)
    path = MetricInducedPath(d, c, 1.0, add_likelihood=True)
    q = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)
    z = torch.arange(vocab)[:, None]  # every state, one position
    got = path.posterior(q.log().expand(vocab, 1, vocab), z, torch.full((vocab,), t, dtype=torch.float64))[:, 0]
    joint = torch.stack([q[k] * reference_probs(d, k, t, c, 1.0) for k in range(vocab)], 1)  # [z, k]
    torch.testing.assert_close(got, joint / joint.sum(1, keepdim=True), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="time"):
        path.log_posterior(q.log().expand(vocab, 1, vocab), z)


@pytest.mark.parametrize("loss", ["generalized_kl", "cross_entropy"])
def test_objective_conforms_on_the_metric_path(loss):
    spec = DataSpec(shape=(3,), kind="discrete", vocab_size=6, num_classes=2)
    path = registry.build("path", {"plugin": "metric_discrete", "metric": "squared"}, spec=spec)
    torch.manual_seed(0)
    model = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 1}, spec=spec)
    batch = {"x": torch.randint(6, (8, 3)), "y": torch.randint(2, (8,))}
    check_objective(lambda: registry.build("objective", {"plugin": "discrete_fm", "loss": loss, "label_dropout": 0.2},
                                           spec=spec, path=path), {"model": model}, batch, name="discrete_fm")


def test_path_config_errors():
    spec = DataSpec(shape=(3,), kind="discrete", vocab_size=6)
    with pytest.raises(ConfigError, match="beta_scale"):
        registry.resolved("path", {"plugin": "metric_discrete", "beta_scale": 0.0})
    with pytest.raises(ConfigError, match="metric"):
        registry.resolved("path", {"plugin": "metric_discrete", "metric": "cosine"})
    with pytest.raises(ConfigError, match="mask token"):
        registry.build("path", {"plugin": "metric_discrete"},
                       spec=DataSpec(shape=(3,), kind="discrete", vocab_size=6, extra={"mask_token": 5}))
    with pytest.raises(ConfigError, match="own schedule"):
        registry.build("path", {"plugin": "metric_discrete"}, spec=spec,
                       scheduler=registry.build("scheduler", {"plugin": "cond_ot"}))
    with pytest.raises(ConfigError, match="discrete data"):
        registry.build("path", {"plugin": "metric_discrete"}, spec=DataSpec(shape=(2,)))
