"""Distributed correctness on CPU with 2 worker processes (gloo), through the `accelerate` launcher.

The 2-process runs are shared between tests (module-scoped fixtures) to keep the suite fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import registry
from core import checkpoint as ckpt
from core.run import main, run

from .. import plugin_fixtures
from ..conftest import RF2D

TWO = ["launcher={plugin='accelerate', num_processes=2}"]
SMALL = ["trainer.log_every=5", "trainer.warmup_steps=0", "backbone.hidden=32", "backbone.depth=2",
         "eval.num_samples=64", "eval.num_pictures=16", "eval.batch_size=64", "solver.steps=2", "eval.untrained=false"]
REGRESSION = [*SMALL, "objective={plugin='regression'}", "trainer.steps=6", "trainer.batch_size=64",
              "trainer.ema_decay=0.0"]


@pytest.fixture(scope="module")
def plugin_env():
    """The test plugin module, in this process and in spawned workers."""
    mp = pytest.MonkeyPatch()
    with registry.temporary_plugin(plugin_fixtures, name="tests.plugin_fixtures"):
        mp.setenv(registry.MODULES_ENV_VAR, "tests.plugin_fixtures")
        yield
    mp.undo()


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.latest(run_dir / "checkpoints"))["model"]


def assert_same(a: dict, b: dict, exact: bool = False) -> None:
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def regression_runs(tmp_path_factory, plugin_env):
    root = tmp_path_factory.mktemp("regression")
    run(RF2D, REGRESSION, out=root / "one")
    run(RF2D, [*REGRESSION, *TWO], out=root / "two")
    run(RF2D, [*REGRESSION, *TWO, "trainer.grad_accum=2"], out=root / "two_accum")
    return root


def test_two_processes_equal_one_process_with_the_same_global_batch(regression_runs):
    assert_same(params(regression_runs / "one"), params(regression_runs / "two"))


def test_accumulation_times_processes_equals_one_big_batch(regression_runs):
    assert_same(params(regression_runs / "one"), params(regression_runs / "two_accum"))


def test_only_rank_zero_writes_and_logs_are_global(regression_runs):
    two = regression_runs / "two"
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 6]
    one = [json.loads(line) for line in (regression_runs / "one" / "metrics.jsonl").read_text().splitlines()]
    # the logged loss is the mean over ranks, i.e. the one-process loss
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx([r["loss"] for r in one if "loss" in r], rel=1e-5)
    assert json.loads((two / "summary.json").read_text())["processes"] == 2


@pytest.fixture(scope="module")
def noisy_runs(tmp_path_factory, plugin_env):
    root = tmp_path_factory.mktemp("noisy")
    common = [*SMALL, "trainer.steps=12", "trainer.batch_size=64", "trainer.checkpoint_every=4", *TWO]
    for name in ("first", "repeat"):
        (root / f"rec-{name}").mkdir()
        run(RF2D, [*common, f"objective={{plugin='flaky', record='{root / f'rec-{name}'}'}}"], out=root / name)
    cut = [*common, f"objective={{plugin='flaky', interrupt_at=9, interrupt_rank=1, marker='{root / 'marker'}'}}"]
    args = [str(RF2D), *sum((["--set", o] for o in cut), []), "--out", str(root / "cut")]
    interrupted = main(args)
    resumed = main([*args, "--resume"])
    return root, interrupted, resumed


def test_per_rank_noise_differs_between_ranks_and_repeats_exactly(noisy_runs):
    root, _, _ = noisy_runs
    first = {r: (root / "rec-first" / f"rank{r}.txt").read_text() for r in (0, 1)}
    repeat = {r: (root / "rec-repeat" / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert first == repeat
    assert first[0] != first[1]
    assert len(first[0].splitlines()) == 12
    assert_same(params(root / "first"), params(root / "repeat"), exact=True)


def test_interrupt_and_resume_on_two_processes_equals_uninterrupted(noisy_runs):
    root, interrupted, resumed = noisy_runs
    assert interrupted == 130 and resumed == 0
    assert (root / "marker").exists()
    assert_same(params(root / "first"), params(root / "cut"), exact=True)
    state = ckpt.load(ckpt.latest(root / "cut" / "checkpoints"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_resume_on_a_different_number_of_processes_says_what_changes(noisy_runs, tmp_path, capsys):
    root, _, _ = noisy_runs
    import shutil

    shutil.copytree(root / "first", tmp_path / "moved")
    overrides = [*SMALL, "trainer.steps=14", "trainer.batch_size=64", "objective={plugin='flaky'}"]
    code = main([str(RF2D), *sum((["--set", o] for o in overrides), []), "--out", str(tmp_path / "moved"), "--resume"])
    assert code == 0
    out = capsys.readouterr().out
    assert "checkpointed on 2 process(es) on 1" in out and "global batch is unchanged" in out
    assert ckpt.load(ckpt.latest(tmp_path / "moved" / "checkpoints"))["step"] == 14


def test_metrics_gathered_over_two_processes_equal_the_one_process_metric(plugin_env):
    g = torch.Generator().manual_seed(0)
    samples, reference = torch.randn(37, 2, generator=g), torch.randn(37, 2, generator=g) + 0.5
    launcher = registry.build("launcher", {"plugin": "accelerate", "num_processes": 2})
    two = launcher.launch(plugin_fixtures.metric_entry, samples, reference, accelerator_kwargs={})
    one = registry.build("launcher", {"plugin": "local", "device": "cpu"}).launch(
        plugin_fixtures.metric_entry, samples, reference, accelerator_kwargs={})
    assert two["rank_count"] != 37 and one["rank_count"] == 37
    assert two["value"] == pytest.approx(one["value"], rel=1e-12)


def test_launcher_runs_the_entry_on_every_rank(tmp_path, plugin_env):
    launcher = registry.build("launcher", {"plugin": "accelerate", "num_processes": 2})
    assert launcher.launch(plugin_fixtures.ranks_entry, str(tmp_path), accelerator_kwargs={}) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
    assert (tmp_path / "rank1").read_text() == "2"


def test_batch_that_does_not_divide_is_a_clear_error(tmp_path, capsys, plugin_env):
    overrides = [*REGRESSION, *TWO, "trainer.batch_size=63"]
    code = main([str(RF2D), *sum((["--set", o] for o in overrides), []), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "must divide by processes x grad_accum = 2 x 1" in capsys.readouterr().err


def test_slurm_launcher_runs_through_submitit_local_executor(tmp_path, tiny_rf2d):
    overrides = [*tiny_rf2d, "trainer.steps=10",
                 f"launcher={{plugin='slurm', executor='local', gpus_per_node=0, cpus_per_task=1, folder='{tmp_path / 'logs' / '%j'}'}}"]
    summary = run(RF2D, overrides, out=tmp_path / "run")
    assert summary["steps"] == 10
    assert ckpt.latest(tmp_path / "run" / "checkpoints").name == "step-00000010.pt"


def test_slurm_job_requeues_itself_with_resume():
    from plugins.launchers.slurm import TrainJob

    job = TrainJob(plugin_fixtures.ranks_entry, ("cfg", "file", "out", False), {"mixed_precision": "no"}, "cpu")
    delayed = job.checkpoint()
    assert delayed.function.args == ("cfg", "file", "out", True)
    assert delayed.function.accelerator_kwargs == {"mixed_precision": "no"}


def test_launcher_options_are_validated(capsys, tmp_path):
    code = main([str(RF2D), "--set", "launcher={plugin='accelerate', num_machines=2, machine_rank=0}",
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "main_process_port" in capsys.readouterr().err


def test_a_rank_killed_mid_run_is_named_with_its_signal(plugin_env):
    import signal

    launcher = registry.build("launcher", {"plugin": "accelerate", "num_processes": 2, "timeout_s": 60})
    with pytest.raises(RuntimeError, match=r"rank 1 died \(exit -9, SIGKILL\)") as info:
        launcher.launch(plugin_fixtures.dying_rank_entry, signal.SIGKILL, accelerator_kwargs={})
    assert "Traceback" not in str(info.value)
