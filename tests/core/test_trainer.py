"""The trainer: determinism, resume equivalence, NaN handling, checkpoints, accumulation, LR schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

import registry
from core import checkpoint as ckpt
from core.config import TrainerConfig
from core.run import main, run
from core.trainer import lr_factor

from ..conftest import RF2D


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def final_params(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.latest(run_dir / "checkpoints"))["model"]


@pytest.fixture
def test_plugin():
    from .. import plugin_fixtures

    with registry.temporary_plugin(plugin_fixtures, name="tests.plugin_fixtures"):
        yield


def flaky(**options) -> str:
    return "objective={" + ", ".join([f"plugin='flaky'"] + [f"{k}={v!r}" for k, v in options.items()]) + "}"


def as_args(overrides) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


def test_same_seed_same_loss_curve(tmp_path, tiny_rf2d):
    run(RF2D, tiny_rf2d, out=tmp_path / "a")
    run(RF2D, tiny_rf2d, out=tmp_path / "b")
    run(RF2D, [*tiny_rf2d, "experiment.seed=1"], out=tmp_path / "c")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")
    pa, pb = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_rf2d, test_plugin):
    common = [*tiny_rf2d, "trainer.steps=30", "trainer.checkpoint_every=10", "trainer.lr_schedule=cosine",
              "trainer.warmup_steps=5"]
    run(RF2D, [*common, flaky()], out=tmp_path / "straight")
    cut = [*common, flaky(interrupt_at=25, marker=str(tmp_path / "marker"))]
    assert main([str(RF2D), *as_args(cut), "--out", str(tmp_path / "cut")]) == 130
    assert ckpt.latest(tmp_path / "cut" / "checkpoints").name == "step-00000020.pt"
    assert main([str(RF2D), *as_args(cut), "--out", str(tmp_path / "cut"), "--resume"]) == 0
    straight, resumed = final_params(tmp_path / "straight"), final_params(tmp_path / "cut")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    ema_a = ckpt.load(ckpt.latest(tmp_path / "straight" / "checkpoints"))["ema"]
    ema_b = ckpt.load(ckpt.latest(tmp_path / "cut" / "checkpoints"))["ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.mark.parametrize(("every_step", "nan_at"), [(True, 13), (False, 13), (False, 14)])
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, tiny_rf2d, test_plugin, capsys,
                                                                        monkeypatch, every_step, nan_at):
    """On the CPU each step's loss is checked before its update. The accelerators' check (forced here) reads
    the interval's loss sum at the next log or write: the checkpoint after the bad step is still not written,
    also when the bad step is the last before it (nan_at=14)."""
    from core import trainer

    monkeypatch.setattr(trainer, "checks_every_step", lambda device: every_step)
    args = [str(RF2D), *as_args([*tiny_rf2d, flaky(nan_at=nan_at), "trainer.checkpoint_every=5"]),
            "--out", str(tmp_path / "nan")]
    assert main(args) == 1
    err = capsys.readouterr().err
    where = f"at step {nan_at}; stopped before applying it" if every_step else "at one of steps 10-14"
    assert f"loss is nan {where}" in err and "Traceback" not in err
    last = ckpt.latest(tmp_path / "nan" / "checkpoints")
    state = ckpt.load(last)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_corrupt_checkpoint_on_resume_exits_2(tmp_path, tiny_rf2d, capsys):
    out = tmp_path / "run"
    run(RF2D, tiny_rf2d, out=out)
    ckpt.latest(out / "checkpoints").write_bytes(b"not a checkpoint")
    assert main([str(RF2D), *sum((["--set", o] for o in tiny_rf2d), []), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or not a flowforge checkpoint" in err and "Traceback" not in err


def test_checkpoint_is_written_atomically_and_loads_as_data(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_atomic({"step": 1, "w": torch.ones(2)}, path)

    def exploding_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        ckpt.save_atomic({"step": 2, "w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"step": 3, "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="corrupt or not a flowforge checkpoint"):
        ckpt.load(tmp_path / "evil.pt")


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_rf2d, test_plugin):
    common = [*tiny_rf2d, "objective={plugin='regression'}", "trainer.steps=6", "trainer.batch_size=64",
              "trainer.ema_decay=0.0", "eval.untrained=false"]
    run(RF2D, common, out=tmp_path / "one")
    run(RF2D, [*common, "trainer.grad_accum=4"], out=tmp_path / "four")
    a, b = final_params(tmp_path / "one"), final_params(tmp_path / "four")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_batch_must_divide_by_accumulation(tmp_path, tiny_rf2d, capsys):
    code = main([str(RF2D), *sum((["--set", o] for o in [*tiny_rf2d, "trainer.grad_accum=3"]), []), "--out", str(tmp_path / "r")])
    assert code == 2 and "must divide by processes x grad_accum" in capsys.readouterr().err


def test_existing_run_directory_is_protected(tmp_path, tiny_rf2d, capsys):
    run(RF2D, tiny_rf2d, out=tmp_path / "r")
    code = main([str(RF2D), *sum((["--set", o] for o in tiny_rf2d), []), "--out", str(tmp_path / "r")])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_run_directory_layout(tmp_path, tiny_rf2d):
    out = tmp_path / "r"
    summary = run(RF2D, tiny_rf2d, out=out)
    for name in ("config.toml", "env.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "flowforge" in env["plugins"]
    assert (out / "samples" / "final.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20]
    assert all(math.isfinite(r["loss"]) and r["it_per_s"] > 0 for r in records if "loss" in r)
    keys = {"energy_distance", "sliced_wasserstein", "off_support/fraction", "off_support/se"}
    assert set(summary["metrics"]) == keys == set(summary["untrained"]) == set(summary["floor"])
    assert summary["nfe"] == 8


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_warmup_and_decay(schedule):
    cfg = TrainerConfig(steps=110, warmup_steps=10, lr_schedule=schedule, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(110)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    if schedule == "constant":
        assert factors[10:] == pytest.approx([1.0] * 100)
    else:
        assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
        mid = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 0.5)) if schedule == "cosine" else 0.5)
        assert factors[60] == pytest.approx(mid)
        assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_tensor_logs_are_averaged_like_float_logs_without_a_read_per_step():
    from core.trainer import accumulate_logs, read_logs

    sums = {}
    for step in range(4):  # two micro-batches per step: each adds half its value
        for micro in range(2):
            accumulate_logs(sums, {"a": torch.tensor(float(step + micro)), "b": 2.0 * step,
                                   "c": torch.tensor(-1.0, dtype=torch.float64),
                                   "v": torch.tensor([1.0, float(step)])}, 0.5)
    assert all(isinstance(sums[k], torch.Tensor) for k in "acv") and isinstance(sums["b"], float)
    # the sums (the trainer divides by the steps); a vector v is logged as v/0, v/1
    assert read_logs(sums) == {"a": 8.0, "c": -4.0, "b": 12.0, "v/0": 4.0, "v/1": 6.0}


def test_binned_logs_are_the_mean_of_each_bin_over_the_interval(monkeypatch):
    """`Binned` values of several micro-batches and steps are binned together when read: each bin's mean over
    every example in it (a ratio of sums, whatever the micro-batch sizes); empty bins are left out; folding
    early (a long interval) gives the same means."""
    import core.trainer as trainer
    from core.interfaces import Binned

    g = torch.Generator().manual_seed(0)
    draws = [(torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64) * 0.75)
             for n in (5, 1, 12, 7)]  # positions < 0.75: the last of 4 bins stays empty
    draws.append((torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)))  # t = 0.5: bin 2
    values, positions = torch.cat([v for v, _ in draws]), torch.cat([p for _, p in draws])
    expected = {}
    for i in range(4):  # the reference: each bin's values, averaged
        inside = [float(v) for v, p in zip(values, positions) if i / 4 <= p < (i + 1) / 4]
        if inside:
            expected[f"loss_bin/{i}"] = sum(inside) / len(inside)
    assert set(expected) == {"loss_bin/0", "loss_bin/1", "loss_bin/2"}
    for fold_at in (1 << 20, 3):
        monkeypatch.setattr(trainer, "FOLD_AT", fold_at)
        sums = {}
        for v, p in draws:
            trainer.accumulate_logs(sums, {"loss_bin": Binned(v, p, 4), "a": 1.0}, 0.5)
        record = trainer.read_logs(sums, steps=len(draws))
        assert record.pop("a") == pytest.approx(0.5)
        assert record.keys() == expected.keys()
        assert all(record[k] == pytest.approx(expected[k], rel=1e-12) for k in expected)
    assert Binned(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.99]), 2).totals()[1].tolist() == [0, 2]  # t = 1: last bin


def test_a_logged_tensor_is_not_aliased_by_the_sums():
    from core.trainer import accumulate_logs, read_logs

    value, sums = torch.tensor([1.0, 2.0]), {}
    accumulate_logs(sums, {"v": value}, 1.0)
    value.mul_(10)  # the objective may reuse its tensor
    accumulate_logs(sums, {"v": value}, 1.0)
    assert read_logs(sums) == {"v/0": 11.0, "v/1": 22.0}


def test_the_training_loop_freezes_the_heap_and_unfreezes_it_however_it_ends():
    """`frozen_heap`: inside, the objects alive at entry are frozen (out of the collector's full passes);
    after it, normal or by an exception, nothing is frozen, and a cycle made inside is still collected."""
    import gc
    import weakref

    from core.trainer import frozen_heap

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 1000
        a = Node()
        a.self = a  # a reference cycle made during the loop
        alive = weakref.ref(a)
        del a
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None
    with pytest.raises(RuntimeError):
        with frozen_heap():
            raise RuntimeError("a failing step")
    assert gc.get_freeze_count() == 0
