"""``--smoke``: every phase of an experiment capped, written as recorded overrides."""

import tomllib

from core import config
from core.run import main
from core.smoke import apply_smoke, smoke_overrides


def test_caps_every_phase_of_the_unet_ddpm_experiment():
    exp = config.load("experiments/ddpm_digits_unet.toml")
    texts = smoke_overrides(exp)
    capped = config.resolve(config.apply_overrides(config.read_toml("experiments/ddpm_digits_unet.toml"), texts))
    assert capped.trainer.steps == 30 and capped.eval.num_samples <= 200 and capped.eval.num_pictures <= 16
    bpd = next(m for m in capped.metrics if m["plugin"] == "ddpm_bpd")
    assert bpd["respacing"] == "25"  # the 1000-step bound becomes a 25-step one
    assert capped.components == {**exp.components}  # model, data, objective, solver unchanged


def test_feature_network_and_sample_budgets_are_capped():
    exp = config.load("experiments/rf_digits.toml")
    capped = config.resolve(config.apply_overrides(config.read_toml("experiments/rf_digits.toml"), smoke_overrides(exp)))
    for metric in capped.metrics:
        assert metric.get("train_steps", 0) <= 50
        assert metric.get("num_samples", 0) <= 200 and metric.get("num_examples", 0) <= 200
    assert capped.trainer.checkpoint_every == 0 and capped.eval.every == 0


def test_user_values_below_the_caps_are_kept():
    raw = config.apply_overrides(config.read_toml("experiments/rectified_flow_2d.toml"),
                                 ["trainer.steps=7", "eval.num_samples=50"])
    exp = config.resolve(apply_smoke(raw))
    assert exp.trainer.steps == 7 and exp.eval.num_samples == 50


def test_stage_overrides_are_capped_too():
    raw = config.read_toml("experiments/tinyclip_progressive.toml")
    out = apply_smoke(raw)
    for stage in out.get("stages", []):
        steps = stage.get("set", {}).get("trainer.steps")
        assert steps is None or steps <= 30


def test_a_smoke_run_records_its_caps_in_config_toml(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["experiments/rectified_flow_2d.toml", "--smoke", "--out", str(out),
                 "--set", "trainer.batch_size=256", "--set", "eval.floor=false"]) == 0
    assert "smoke mode: --set trainer.steps=30" in capsys.readouterr().out
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["trainer"]["steps"] == 30 and saved["eval"]["num_samples"] == 200
