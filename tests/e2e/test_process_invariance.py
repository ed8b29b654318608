"""Process-count invariance on the real experiments (DESIGN.md, "Scale").

Every random draw that touches a training example is a pure function of (seed, step, global
example index) (`core.rng`), so the same global batch on 1 or 2 processes (the ``accelerate``
launcher, gloo on CPU) and any ``grad_accum`` / ``microbatch`` split gives the same parameters
up to floating-point reduction order. Each experiment keeps its model, data, batch and objective;
only evaluation is switched off (no metrics, pictures, floor or untrained evaluation).

TinyCLIP's comparison leaves out the key third of each attention ``qkv.bias``: its true gradient is
identically zero (proved below), so AdamW moves it by lr-sized steps of rounding noise in any two runs
that differ in reduction order (measured: up to 7e-5 there, against <= 3e-7 for every other parameter).

Runs are cached per module (`runs`), so each test pays only for the runs it adds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core import checkpoint as ckpt
from core import rng
from core.guidance import drop_labels
from core.run import run

from ..conftest import ROOT

TOL = 1e-5
TWO = ["launcher={plugin='accelerate', num_processes=2}"]
NO_EVAL = ["metrics=[]", "eval.num_pictures=0", "eval.untrained=false", "eval.floor=false",
           "trainer.progress='off'", "trainer.checkpoint_every=0"]
#: experiment -> (file, overrides, batch size)
EXPERIMENTS = {
    "rectified_flow_2d": ("rectified_flow_2d", ["trainer.steps=40"], 1024),
    "ddpm_digits": ("ddpm_digits", ["trainer.steps=20"], 256),
    "discrete_flow_digits": ("discrete_flow_digits", ["trainer.steps=20"], 256),
    "tinyclip_distill": ("tinyclip_distill", ["trainer.steps=10"], 128),
}
GENERATIVE = ["rectified_flow_2d", "ddpm_digits", "discrete_flow_digits"]


class Runs:
    """Runs of the experiments, made on first use, each in its own directory under `root`."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}
        self.teacher: Path | None = None

    def overrides(self, name: str) -> list[str]:
        extra = list(EXPERIMENTS[name][1])
        if name == "tinyclip_distill":
            teacher = self.tinyclip_teacher()
            extra += [f"objective.teacher='{teacher}'", f"backbone.inherit_from='{teacher}'"]
        return [*NO_EVAL, *extra]

    def tinyclip_teacher(self) -> Path:
        """A briefly trained teacher (its weights only need to be the same for every student run)."""
        if self.teacher is None:
            self.teacher = self.root / "teacher"
            run(ROOT / "experiments" / "tinyclip_teacher.toml", [*NO_EVAL, "trainer.steps=3"], out=self.teacher)
        return self.teacher

    def params(self, name: str, variant: str, *extra: str) -> dict[str, torch.Tensor]:
        key = (name, variant)
        if key not in self.done:
            out = self.root / f"{name}-{variant}"
            one_thread = not any("accelerate" in e for e in extra)
            threads = torch.get_num_threads()
            if one_thread:
                torch.set_num_threads(1)  # as each of the 2 workers does; a loaded 2-core box thrashes otherwise
            try:
                run(ROOT / "experiments" / f"{EXPERIMENTS[name][0]}.toml", [*self.overrides(name), *extra], out=out)
            finally:
                torch.set_num_threads(threads)
            self.done[key] = ckpt.load(ckpt.latest(out / "checkpoints"))["model"]
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("invariance"))


def key_bias_free(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`params` without the key third of each attention ``qkv.bias`` (rows ordered [q | k | v]).

    A key bias ``b_k`` adds ``q . b_k`` to every logit of a query's row, which the softmax cancels:
    its gradient is identically zero (`test_the_key_bias_gets_no_gradient`), so what AdamW applies
    to it is ``lr * g / sqrt(v)`` of floating-point noise, of size ``lr`` whatever the noise's size.
    Two runs that differ only in reduction order differ there by O(lr), not O(rounding).
    """
    out = {}
    for k, v in params.items():
        if k.endswith("attn.qkv.bias"):
            q, _, val = v.chunk(3)
            v = torch.cat([q, val])
        out[k] = v
    return out


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_two_processes_give_the_parameters_of_one(runs, name):
    one, two = runs.params(name, "one"), runs.params(name, "two", *TWO)
    if name == "tinyclip_distill":
        print(f"{name}: with the key biases {max_difference(one, two):.3g}")
        one, two = key_bias_free(one), key_bias_free(two)
    diff = max_difference(one, two)
    print(f"{name}: max |theta_1 - theta_2| = {diff:.3g}")
    assert diff <= TOL, f"{name}: 1 vs 2 processes differ by {diff:.3g}"


@pytest.mark.parametrize("name", GENERATIVE)
def test_grad_accum_and_microbatch_splits_give_the_unsplit_parameters(runs, name):
    batch = EXPERIMENTS[name][2]
    one = runs.params(name, "one")
    accum = runs.params(name, "accum2", "trainer.grad_accum=2")
    micro = runs.params(name, "micro", f"trainer.microbatch={batch // 4}")
    diffs = max_difference(one, accum), max_difference(one, micro)
    print(f"{name}: grad_accum=2 {diffs[0]:.3g}, microbatch={batch // 4} {diffs[1]:.3g}")
    assert max(diffs) <= TOL, f"{name}: split runs differ by {diffs}"


def test_a_different_seed_changes_the_parameters(runs):
    """The comparison above is not vacuous: the draws matter at this tolerance."""
    one = runs.params("rectified_flow_2d", "one")
    other = runs.params("rectified_flow_2d", "seed1", "experiment.seed=1")
    assert max_difference(one, other) > 1e-3


def test_the_key_bias_gets_no_gradient():
    """The softmax over keys is invariant to ``q . b_k``: d loss / d b_k = 0 (float64), unlike q and v biases."""
    from plugins.tinyclip.model import Attention

    g = torch.Generator().manual_seed(0)
    attn = Attention(8, 2).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    for causal in (False, True):
        attn.zero_grad()
        x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
        (attn(x, causal) * torch.randn(3, 5, 8, generator=g, dtype=torch.float64)).sum().backward()
        gq, gk, gv = attn.qkv.bias.grad.chunk(3)
        assert gk.abs().max() < 1e-12 * gq.abs().max()
        assert gq.abs().max() > 1e-3 and gv.abs().max() > 1e-3


# --------------------------------------------------------------------------- the draws themselves
def test_label_dropout_is_per_example_and_has_rate_p():
    seeds = rng.example_seeds(0, 3, torch.arange(20000))
    y = torch.randint(10, (20000,), generator=torch.Generator().manual_seed(0))
    full = drop_labels(y, 0.25, 10, rng.ExampleRandom(seeds))
    halves = torch.cat([drop_labels(y[:7000], 0.25, 10, rng.ExampleRandom(seeds[:7000])),
                        drop_labels(y[7000:], 0.25, 10, rng.ExampleRandom(seeds[7000:]))])
    assert torch.equal(full, halves)
    dropped = (full == 10).double().mean().item()
    assert abs(dropped - 0.25) < 4 * (0.25 * 0.75 / 20000) ** 0.5
    assert torch.equal(full[full != 10], y[full != 10])
    assert torch.equal(drop_labels(y, 0.0, 10), y)


@pytest.mark.parametrize("world", [2, 4])
def test_data_draws_of_the_ranks_make_the_one_process_batch(world):
    """Flips, text windows and quantised toy points: the ranks' shares concatenate to the 1-process batch."""
    import registry
    from plugins.data.npz import flip_mask

    per, step = 8, 5
    assert torch.equal(torch.cat([flip_mask(0, step, per, r, world) for r in range(world)]),
                       flip_mask(0, step, per * world))
    for spec in ({"plugin": "toy2d_discrete"}, {"plugin": "text", "seq_len": 16}):
        data = registry.build("data", spec)
        whole = next(data.train_batches(per * world, seed=0, start_step=step))["x"]
        parts = [next(data.train_batches(per, seed=0, start_step=step, rank=r, world_size=world))["x"]
                 for r in range(world)]
        assert torch.equal(torch.cat(parts), whole), spec


def test_schedule_sampler_inverse_cdf_law():
    """loss-second-moment's per-example draws follow its probabilities (chi-square)."""
    from scipy import stats

    from plugins.ddpm.resample import LossSecondMomentResampler

    s = LossSecondMomentResampler(5, history_per_term=1, uniform_prob=0.0)
    s.update_with_all_losses([0, 1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0, 10.0])
    n = 40000
    k, w = s.sample(n, "cpu", rng.ExampleRandom(rng.example_seeds(0, 0, torch.arange(n))))
    p = torch.tensor([1.0, 2, 3, 4, 10]) / 20
    counts = torch.bincount(k, minlength=5).double()
    assert stats.chisquare(counts.numpy(), (p * n).double().numpy()).pvalue > 1e-3
    torch.testing.assert_close(w, (1.0 / (5 * p[k])).float())
