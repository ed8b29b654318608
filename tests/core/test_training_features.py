"""Training features the reference recipes rely on: micro-batching, several EMA rates, fp16 loss scaling,
epochs, the LR scaling rule, gradient checkpointing, best-checkpoint selection, early stopping and
initialisation from another run (trainer.init_from)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import registry
from core import checkpoint as ckpt
from core.config import TrainerConfig
from core.ema import EMA
from core.run import main, run
from core.trainer import enable_gradient_checkpointing, scaled_lr

from .. import plugin_fixtures
from ..conftest import RF2D, TINY_RF2D

DIGITS = ["data={plugin='digits'}", "trainer.batch_size=500", "eval.num_samples=100", "eval.num_pictures=20",
          "eval.batch_size=100", "backbone.hidden=64", "backbone.depth=2", "solver.steps=2", "trainer.log_every=1",
          "metrics=[{plugin='energy_distance'}]", "backbone.input_freqs=0"]


@pytest.fixture
def fixtures_plugin():
    with registry.temporary_plugin(plugin_fixtures, name="tests.plugin_fixtures"):
        yield


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_microbatch_equals_whole_batch(tmp_path, tiny_rf2d, fixtures_plugin):
    common = [*tiny_rf2d, "objective={plugin='regression'}", "trainer.steps=4", "trainer.ema_decay=0.0",
              "eval.untrained=false"]
    run(RF2D, common, out=tmp_path / "whole")
    run(RF2D, [*common, "trainer.microbatch=16"], out=tmp_path / "micro")
    a = ckpt.load(ckpt.latest(tmp_path / "whole" / "checkpoints"))["model"]
    b = ckpt.load(ckpt.latest(tmp_path / "micro" / "checkpoints"))["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_ema_follows_its_closed_form():
    """After updates with weights p_1..p_k from p_0: ema_k = d^k p_0 + (1 - d) sum_j d^(k-j) p_j."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    history = [model.weight.detach().clone()]
    ema = EMA(model, 0.8)
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        history.append(model.weight.detach().clone())
        ema.update(model)
    d, k = 0.8, 5
    expected = d**k * history[0] + sum((1 - d) * d ** (k - j) * history[j] for j in range(1, k + 1))
    torch.testing.assert_close(ema.model.weight, expected, rtol=1e-6, atol=1e-6)


def test_several_ema_rates_each_follow_their_own_decay(tmp_path, tiny_rf2d):
    out = tmp_path / "emas"
    summary = run(RF2D, [*tiny_rf2d, "trainer.steps=3", "trainer.ema_decay=[0.9, 0.5]", "trainer.checkpoint_every=1",
                         "trainer.keep_checkpoints=5"], out=out)
    s2, s3 = ckpt.load(ckpt.path_for(out / "checkpoints", 2)), ckpt.load(ckpt.path_for(out / "checkpoints", 3))
    for rate in (0.9, 0.5):
        for key, theta in s3["model"].items():
            expected = rate * s2["ema_rates"][str(rate)][key] + (1 - rate) * theta
            torch.testing.assert_close(s3["ema_rates"][str(rate)][key], expected, rtol=1e-6, atol=1e-7)
    assert set(summary["metrics_by_ema"]) == {"0.9", "0.5"}
    assert (out / "samples" / "final-ema0.5.png").exists()


def test_fp16_loss_scaling_skips_an_overflowing_step_and_recovers(tmp_path, tiny_rf2d, fixtures_plugin):
    out = tmp_path / "fp16"
    summary = run(RF2D, [*tiny_rf2d, "trainer.precision='fp16'", "objective={plugin='flaky', nan_at=7}",
                         "trainer.log_every=1"], out=out)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 20
    logs = {r["step"]: r for r in records(out) if "loss" in r}
    assert logs[8]["skipped_steps"] == 1 and logs[8]["loss_scale"] == logs[7]["loss_scale"] / 2
    assert all(logs[s]["skipped_steps"] == 0 for s in logs if s != 8)
    params = ckpt.load(ckpt.latest(out / "checkpoints"))["model"]
    assert all(torch.isfinite(v).all() for v in params.values())


def test_bf16_autocast_runs_close_to_fp32(tmp_path, tiny_rf2d):
    a = run(RF2D, [*tiny_rf2d, "trainer.steps=5"], out=tmp_path / "fp32")
    b = run(RF2D, [*tiny_rf2d, "trainer.steps=5", "trainer.precision='bf16'"], out=tmp_path / "bf16")
    assert abs(a["final_loss"] - b["final_loss"]) < 0.1 * a["final_loss"]


def test_best_checkpoint_keeps_the_best_step(tmp_path, tiny_rf2d):
    out = tmp_path / "best"
    summary = run(RF2D, [*tiny_rf2d, "trainer.steps=20", "eval.every=5", "trainer.monitor='sliced_wasserstein'"], out=out)
    evals = {r["step"]: r["eval/sliced_wasserstein"] for r in records(out) if "eval/sliced_wasserstein" in r}
    best_step = min(evals, key=evals.get)
    assert summary["best"]["step"] == best_step and summary["best"]["value"] == pytest.approx(evals[best_step])
    best = ckpt.load(out / "checkpoints" / "best.pt")
    assert best["step"] == best_step
    assert ckpt.latest(out / "checkpoints").name == "step-00000020.pt"


def test_early_stopping_stops(tmp_path, tiny_rf2d, fixtures_plugin, capsys):
    out = tmp_path / "early"
    summary = run(RF2D, [*tiny_rf2d, "trainer.steps=40", "eval.every=5", "metrics=[{plugin='constant'}]",
                         "trainer.monitor='constant/value'", "trainer.early_stopping_patience=2"], out=out)
    assert summary["stopped_early"] and summary["steps"] == 15
    assert summary["best"]["step"] == 5
    assert "early stopping at step 15" in capsys.readouterr().out


def test_epochs_set_the_run_length(tmp_path):
    summary = run(RF2D, [*DIGITS, "trainer.epochs=2", "trainer.warmup_epochs=1.0"], out=tmp_path / "epochs")
    assert summary["steps"] == 6 and summary["epochs"] == 2.0  # ceil(1437 / 500) = 3 steps per epoch
    logs = {r["step"]: r["lr"] for r in records(tmp_path / "epochs") if "lr" in r}
    assert logs[1] == pytest.approx(1e-2 / 3) and logs[3] == pytest.approx(1e-2)


def test_epochs_on_an_endless_source_is_a_clear_error(tmp_path, capsys):
    assert main([str(RF2D), "--set", "trainer.epochs=1", "--out", str(tmp_path / "r")]) == 2
    assert "endless" in capsys.readouterr().err


def test_linear_and_sqrt_lr_scaling():
    assert scaled_lr(TrainerConfig(lr=1e-4, batch_size=512, base_batch_size=256, lr_scaling="linear")) == pytest.approx(2e-4)
    assert scaled_lr(TrainerConfig(lr=1e-4, batch_size=1024, base_batch_size=256, lr_scaling="sqrt")) == pytest.approx(2e-4)
    assert scaled_lr(TrainerConfig(lr=1e-4, batch_size=1024)) == 1e-4


def test_gradient_checkpointing_switch(tmp_path, capsys):
    class Block(nn.Module):
        gradient_checkpointing = False

    model = nn.Sequential(Block(), nn.Linear(2, 2), Block())
    assert enable_gradient_checkpointing(model) == 2 and all(m.gradient_checkpointing for m in model if isinstance(m, Block))
    assert main([str(RF2D), "--set", "trainer.gradient_checkpointing=true", "--out", str(tmp_path / "r")]) == 2
    assert "does not support gradient checkpointing" in capsys.readouterr().err


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished tiny 2D run whose EMA and raw weights differ (ema_decay 0.9 over 20 steps)."""
    out = tmp_path_factory.mktemp("init") / "source"
    run(RF2D, [*TINY_RF2D, "trainer.ema_decay=0.9", "eval.untrained=false"], out=out)
    return out


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_init_from_starts_from_the_source_weights(tmp_path, tiny_rf2d, source_run, weights):
    """With lr = 0 one step changes nothing, so the new run's raw and EMA weights are the source's chosen ones."""
    source = ckpt.load(ckpt.latest(source_run / "checkpoints"))
    out = tmp_path / "init"
    run(RF2D, [*tiny_rf2d, "trainer.steps=1", "trainer.lr=0.0", f"trainer.init_from='{source_run}'",
               f"trainer.init_weights='{weights}'", "trainer.ema_decay=0.9", "eval.untrained=false"], out=out)
    new = ckpt.load(ckpt.latest(out / "checkpoints"))
    expected = source["ema" if weights == "ema" else "model"]
    other = source["model" if weights == "ema" else "ema"]
    assert any(not torch.equal(expected[k], other[k]) for k in expected)  # the choice is visible
    for key, value in expected.items():
        torch.testing.assert_close(new["model"][key], value, rtol=0, atol=0)
        torch.testing.assert_close(new["ema"][key], value, rtol=1e-6, atol=1e-7)


def test_init_from_a_checkpoint_file(tmp_path, tiny_rf2d, source_run):
    file = ckpt.latest(source_run / "checkpoints")
    out = tmp_path / "file"
    run(RF2D, [*tiny_rf2d, "trainer.steps=1", "trainer.lr=0.0", f"trainer.init_from='{file}'",
               "eval.untrained=false"], out=out)
    new, source = ckpt.load(ckpt.latest(out / "checkpoints")), ckpt.load(file)
    assert all(torch.equal(new["model"][k], v) for k, v in source["ema"].items())


@pytest.mark.parametrize("override, message", [
    ("backbone.hidden=16", "do not fit this backbone"),
    ("trainer.init_from='{missing}'", "does not exist"),
])
def test_init_from_refuses_a_mismatch_before_writing(tmp_path, tiny_rf2d, source_run, capsys, override, message):
    out = tmp_path / "bad"
    sets = [*tiny_rf2d, f"trainer.init_from='{source_run}'", override.format(missing=tmp_path / "nowhere")]
    assert main([str(RF2D), *[a for s in sets for a in ("--set", s)], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "trainer.init_from" in err and "Traceback" not in err
    assert not out.exists()


def test_init_from_is_ignored_when_the_run_resumes(tmp_path, tiny_rf2d, source_run):
    """A resumed run continues from its own checkpoint: the source may be gone by then."""
    copy = tmp_path / "copy"
    shutil.copytree(source_run, copy)
    sets = [*tiny_rf2d, "trainer.steps=2", f"trainer.init_from='{copy}'", "eval.untrained=false"]
    out = tmp_path / "resumed"
    run(RF2D, sets, out=out)
    before = ckpt.load(ckpt.latest(out / "checkpoints"))["model"]
    shutil.rmtree(copy)
    summary = run(RF2D, sets, out=out, resume=True)
    assert summary["steps"] == 2
    after = ckpt.load(ckpt.latest(out / "checkpoints"))["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
