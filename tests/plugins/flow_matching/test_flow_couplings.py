"""Minibatch couplings (plugins/flow_matching/couplings.py): exact OT against brute force and closed forms,
log-domain Sinkhorn against the exact OT cost, class-conditional OT, block invariance under sharding, and the
objective's options and errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core import rng
from core.interfaces import DataSpec
from plugins.flow_matching.couplings import (couple, coupled_source, exact_assignment, sample_rows, sinkhorn_plan,
                                             squared_distances)


def brute_force_cost(cost: torch.Tensor) -> float:
    c = cost.tolist()
    return min(sum(row[j] for row, j in zip(c, p)) for p in itertools.permutations(range(len(c))))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), dim=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_exact_assignment_is_optimal_against_all_permutations(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x_1, x_0 = torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, dim, generator=g,
                                                                                   dtype=torch.float64)
    cost = squared_distances(x_1, x_0)
    j = exact_assignment(cost)
    assert sorted(j.tolist()) == list(range(n))  # a permutation
    assert float(cost[torch.arange(n), j].sum()) == pytest.approx(brute_force_cost(cost), abs=1e-9)


def test_squared_distances_closed_form():
    x_1 = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    x_0 = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    assert squared_distances(x_1, x_0).tolist() == [[25.0, 1.0, 0.0], [8.0, 4.0, 5.0]]


def test_ot_of_a_shifted_cloud_is_the_translation():
    """x_1 = x_0[perm] + c: the pairing x_1[i] <-> x_0[perm[i]] has cost n |c|^2, the minimum (the cross
    term 2 c . (sum x_1 - sum x_0) is the same for every pairing), so OT undoes the shuffle exactly."""
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    perm = torch.randperm(64, generator=g)
    shift = torch.tensor([5.0, -3.0], dtype=torch.float64)
    x_1 = x_0[perm] + shift
    assert torch.equal(couple("ot", x_1, x_0), x_0[perm])
    assert torch.allclose(x_1 - couple("ot", x_1, x_0), shift.expand(64, 2))


def test_ot_in_one_dimension_is_the_sorted_matching():
    g = torch.Generator().manual_seed(1)
    x_1 = torch.randn(50, 1, generator=g, dtype=torch.float64) * 2 + 1
    x_0 = torch.randn(50, 1, generator=g, dtype=torch.float64)
    paired = couple("ot", x_1, x_0)
    order = torch.argsort(x_1[:, 0])
    assert torch.equal(paired[order, 0], torch.sort(x_0[:, 0]).values)


def test_sinkhorn_plan_has_uniform_marginals_and_converges_to_the_ot_cost():
    """0 <= <P_eps, C> - OT <= eps (H(P_eps) - H(P*)) <= eps log n for uniform marginals (H in [log n, 2 log n])."""
    g = torch.Generator().manual_seed(2)
    n = 24
    cost = squared_distances(torch.randn(n, 2, generator=g, dtype=torch.float64) + 1,
                             torch.randn(n, 2, generator=g, dtype=torch.float64))
    exact = float(cost[torch.arange(n), exact_assignment(cost)].sum()) / n
    gaps = []
    for eps in (1.0, 0.1, 0.01, 0.001):
        plan = sinkhorn_plan(cost, eps, iters=1500, tol=1e-8)
        assert torch.allclose(plan.sum(0), torch.full((n,), 1.0 / n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(plan.sum(1), torch.full((n,), 1.0 / n, dtype=torch.float64), atol=1e-6)
        gap = float((plan * cost).sum()) - exact
        assert -1e-5 <= gap <= eps * math.log(n) + 1e-5
        gaps.append(gap)
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] and gaps[3] < 1e-4


def test_sample_rows_draws_each_column_with_its_plan_probability():
    plan = torch.tensor([[0.1, 0.3, 0.6], [0.5, 0.0, 0.5]], dtype=torch.float64)
    k = 1000
    u = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    for i in range(2):
        j = sample_rows(plan[i].expand(k, 3), u)
        freq = torch.bincount(j, minlength=3).double() / k
        assert torch.allclose(freq, plan[i] / plan[i].sum(), atol=1.5 / k)


def test_class_ot_pairs_within_labels_optimally():
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1])
    x_1, x_0 = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    paired = couple("class_ot", x_1, x_0, y=y)
    rows = [int(torch.nonzero((x_0 == r).all(1))[0]) for r in paired]
    assert sorted(rows) == list(range(8))
    assert all(int(y[j]) == int(y[i]) for i, j in enumerate(rows))
    for label in (0, 1, 2):
        idx = torch.nonzero(y == label).reshape(-1)
        cost = squared_distances(x_1[idx], x_0[idx])
        got = float(((x_1[idx] - paired[idx]) ** 2).sum())
        assert got == pytest.approx(brute_force_cost(cost), abs=1e-9)


@pytest.mark.parametrize("kind", ["ot", "sinkhorn"])
def test_block_coupling_is_process_count_invariant(kind):
    """A global batch of 16 on 1 process vs 2 ranks (the trainer's contiguous shards and per-example seeds):
    with coupling_block = 4 every example gets the same source point; block 0 (per-rank OT) does not."""
    seed, step, n = 7, 3, 16
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cfg = registry.build("objective", {"plugin": "flow_matching", "coupling": kind, "coupling_block": 4,
                                       "sinkhorn_eps": 0.5}, spec=DataSpec(shape=(2,)),
                         path=registry.build("path", {"plugin": "affine"},
                                             scheduler=registry.build("scheduler", {"plugin": "cond_ot"})))

    def source(conf, batch):
        return coupled_source(conf, 0.5, batch, rng.for_batch(batch), cfg.path)

    whole = source(cfg.config, {"x": x, "seeds": rng.shard_seeds(seed, step, n, 0)})
    shards = [source(cfg.config, {"x": x[r * 8:(r + 1) * 8], "seeds": rng.shard_seeds(seed, step, 8, r)})
              for r in range(2)]
    assert torch.equal(whole, torch.cat(shards))
    cfg.config.coupling_block = 0
    whole0 = source(cfg.config, {"x": x, "seeds": rng.shard_seeds(seed, step, n, 0)})
    shards0 = [source(cfg.config, {"x": x[r * 8:(r + 1) * 8], "seeds": rng.shard_seeds(seed, step, 8, r)})
               for r in range(2)]
    assert not torch.equal(whole0, torch.cat(shards0))


def objective(spec=DataSpec(shape=(2,)), path="affine", **options):
    scheduler = registry.build("scheduler", {"plugin": "cond_ot"})
    p = registry.build("path", {"plugin": path}, scheduler=scheduler)
    return registry.build("objective", {"plugin": "flow_matching", **options}, spec=spec, scheduler=scheduler, path=p)


def test_ot_coupling_lowers_the_pair_cost_and_trains():
    obj = objective(coupling="ot")
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(5)) * 0.5
    batch = {"x": x, "seeds": rng.shard_seeds(0, 0, 256)}
    draw = rng.for_batch(batch)
    indep = draw.randn_like(x, "noise")
    ot = coupled_source(obj.config, None, batch, draw, obj.path)
    assert ((x - ot) ** 2).sum() < 0.5 * ((x - indep) ** 2).sum()
    assert torch.equal(torch.sort(ot[:, 0]).values, torch.sort(indep[:, 0]).values)  # the same noise, re-paired
    model = torch.nn.Linear(2, 2)
    loss, _ = obj.loss({"model": lambda xt, t, y=None: model(xt)}, batch, 0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("options,spec,message", [
    ({"coupling": "class_ot"}, DataSpec(shape=(2,)), "num_classes = 0"),
    ({"coupling": "sinkhorn"}, DataSpec(shape=(2,)), "sinkhorn_eps"),
    ({"coupling_block": -1}, DataSpec(shape=(2,)), "non-negative"),
    ({"coupling": "sinkhorn", "sinkhorn_eps": 0.0}, DataSpec(shape=(2,)), "positive"),
])
def test_bad_coupling_options_are_config_errors(options, spec, message):
    with pytest.raises(registry.ConfigError, match=message):
        objective(spec=spec, **options)


def test_coupling_refuses_paired_data_and_a_block_that_does_not_divide():
    obj = objective(coupling="ot", coupling_block=3)
    model = {"model": lambda xt, t, y=None: xt}
    with pytest.raises(registry.ConfigError, match="does not divide"):
        obj.loss(model, {"x": torch.randn(8, 2)}, 0)
    with pytest.raises(registry.ConfigError, match="reflow"):
        obj.loss(model, {"x": torch.randn(6, 2), "x0": torch.randn(6, 2)}, 0)


def test_trainer_splits_give_the_same_parameters_with_block_coupling(tmp_path):
    """The real trainer: rectified_flow_2d with OT on blocks of 128 reaches the same parameters unsplit and with
    grad_accum = 2 / microbatch = 128 (each micro-batch holds whole blocks); per-micro-batch OT (block 0) does not."""
    from core import checkpoint as ckpt
    from core.run import run

    from ...conftest import ROOT

    base = ["metrics=[]", "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false", "trainer.progress='off'",
            "trainer.checkpoint_every=0", "trainer.steps=6", "trainer.batch_size=256", "objective.coupling='ot'"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def params(name, *extra):
        try:
            run(ROOT / "experiments" / "rectified_flow_2d.toml", [*base, *extra], out=tmp_path / name)
        finally:
            torch.set_num_threads(threads)
        return ckpt.load(ckpt.latest(tmp_path / name / "checkpoints"))["model"]

    def diff(a, b):
        return max((a[k].double() - b[k].double()).abs().max().item() for k in a)

    one = params("one", "objective.coupling_block=128")
    accum = params("accum", "objective.coupling_block=128", "trainer.grad_accum=2")
    micro = params("micro", "objective.coupling_block=128", "trainer.microbatch=128")
    assert max(diff(one, accum), diff(one, micro)) <= 1e-5
    whole = params("whole", "objective.coupling_block=0")
    whole_accum = params("whole-accum", "objective.coupling_block=0", "trainer.grad_accum=2")
    assert diff(whole, whole_accum) > 1e-4


def test_kernel_and_log_domain_sinkhorn_reach_the_same_plan(monkeypatch):
    import plugins.flow_matching.couplings as couplings

    g = torch.Generator().manual_seed(6)
    cost = squared_distances(torch.rand(64, 2, generator=g, dtype=torch.float64) * 6 - 3,
                             torch.randn(64, 2, generator=g, dtype=torch.float64))
    kernel = sinkhorn_plan(cost, 0.5, tol=1e-10, iters=5000)  # max(C) / eps < 300: kernel scalings
    monkeypatch.setattr(couplings, "KERNEL_MAX", 0.0)
    log_domain = sinkhorn_plan(cost, 0.5, tol=1e-10, iters=5000)
    assert torch.allclose(kernel, log_domain, atol=1e-10)


def test_pot_is_used_when_installed(monkeypatch):
    """With a POT module present, exact_assignment reads the permutation off ot.emd's plan (here a stand-in
    that solves the linear programme by enumerating the permutations, the vertices of the uniform polytope)."""
    import sys
    import types

    import numpy as np

    calls = []

    def emd(a, b, m):
        calls.append(m.shape)
        n = len(a)
        best = min(itertools.permutations(range(n)), key=lambda p: sum(m[i, p[i]] for i in range(n)))
        plan = np.zeros((n, n))
        plan[np.arange(n), list(best)] = 1.0 / n
        return plan

    monkeypatch.setitem(sys.modules, "ot", types.SimpleNamespace(emd=emd))
    g = torch.Generator().manual_seed(8)
    cost = squared_distances(torch.randn(5, 2, generator=g, dtype=torch.float64),
                             torch.randn(5, 2, generator=g, dtype=torch.float64))
    j = exact_assignment(cost)
    assert calls == [(5, 5)]
    assert float(cost[torch.arange(5), j].sum()) == pytest.approx(brute_force_cost(cost), abs=1e-12)
