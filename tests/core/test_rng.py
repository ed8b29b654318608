"""core.rng: per-example draws are a pure function of (seed, step, global index) and have the right law."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from core import rng


def _splitmix_reference(z: int) -> int:
    """SplitMix64's finaliser written from the published constants (unsigned Python ints)."""
    m = (1 << 64) - 1
    z &= m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


@given(st.lists(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), min_size=1, max_size=20))
def test_mix_matches_unsigned_reference(values):
    out = rng.mix(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [o & ((1 << 64) - 1) for o in out] == [_splitmix_reference(v) for v in values]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), step=st.integers(0, 10**6), batch=st.integers(2, 64), data=st.data())
def test_draws_do_not_depend_on_batch_split_or_order(seed, step, batch, data):
    index = torch.arange(batch)
    seeds = rng.example_seeds(seed, step, index)
    full = rng.ExampleRandom(seeds).randn((3,), "noise")
    perm = torch.tensor(data.draw(st.permutations(range(batch))))
    cut = data.draw(st.integers(1, batch - 1))
    parts = [rng.ExampleRandom(rng.example_seeds(seed, step, index[perm][:cut])).randn((3,), "noise"),
             rng.ExampleRandom(rng.example_seeds(seed, step, index[perm][cut:])).randn((3,), "noise")]
    assert torch.equal(torch.cat(parts), full[perm])


def test_streams_steps_and_seeds_are_distinct():
    seeds = rng.example_seeds(0, 5, torch.arange(1000))
    a = rng.uniform(seeds, (4,), "noise")
    assert not torch.equal(a, rng.uniform(seeds, (4,), "time"))
    assert not torch.equal(a, rng.uniform(rng.example_seeds(0, 6, torch.arange(1000)), (4,), "noise"))
    assert not torch.equal(a, rng.uniform(rng.example_seeds(1, 5, torch.arange(1000)), (4,), "noise"))
    # neighbouring examples and neighbouring elements are uncorrelated
    u = a.double().numpy()
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.1
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1


def test_uniform_and_normal_laws():
    seeds = rng.example_seeds(3, 0, torch.arange(4000))
    u = rng.uniform(seeds, (5,), "u", torch.float64).flatten().numpy()
    assert u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    z = rng.normal(seeds, (5,), "z", torch.float64).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 4 / math.sqrt(z.size) * 1.5 and abs(z.std() - 1) < 0.02
    k = rng.randint(seeds, 2, 9, (5,), "k").flatten().numpy()
    assert set(np.unique(k)) == set(range(2, 9))
    assert stats.chisquare(np.bincount(k - 2)).pvalue > 1e-3


def test_fallback_uses_global_rng():
    batch = {"x": torch.zeros(6, 2)}
    torch.manual_seed(0)
    a = rng.for_batch(batch).randn_like(batch["x"], "noise")
    torch.manual_seed(0)
    assert torch.equal(a, torch.randn(6, 2))
    seeded = rng.for_batch({**batch, "seeds": rng.example_seeds(0, 0, torch.arange(6))})
    assert seeded.randn_like(batch["x"], "noise").shape == (6, 2)


def test_shard_seeds_of_the_ranks_are_the_global_batch_seeds():
    whole = rng.example_seeds(7, 11, torch.arange(24))
    for world in (1, 2, 3, 4):
        per = 24 // world
        assert torch.equal(torch.cat([rng.shard_seeds(7, 11, per, r) for r in range(world)]), whole)
