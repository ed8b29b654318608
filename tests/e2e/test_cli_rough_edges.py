"""The command line's rough edges (issue: the researcher's first hour)."""

import pytest

from core import cli
from core.config import apply_overrides
from registry import ConfigError


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("flowforge ")


def test_mistyped_command_suggests_the_nearest(capsys):
    assert cli.main(["smaple", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'smaple'" in err and '"sample"' in err


def test_options_with_a_mistyped_kind_names_the_kind(capsys):
    assert cli.main(["plugins", "--options", "sovler", "ode"]) == 2
    err = capsys.readouterr().err
    assert "unknown kind 'sovler'" in err and '"solver"' in err


def test_plugins_listing_shows_registration_docs(capsys):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "solver:ode" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("data:digits"))
    assert "digits" in line.split("data:digits", 1)[1]  # the doc= text follows the name


def test_set_addresses_an_entry_of_a_list_of_tables():
    raw = {"metrics": [{"plugin": "a", "num_samples": 5}, {"plugin": "b"}]}
    out = apply_overrides(raw, ["metrics.0.num_samples=100", "metrics.-1.x=2"])
    assert out["metrics"] == [{"plugin": "a", "num_samples": 100}, {"plugin": "b", "x": 2}]
    assert raw["metrics"][0]["num_samples"] == 5  # the input is not changed
    with pytest.raises(ConfigError, match="address an entry by its index"):
        apply_overrides(raw, ["metrics.first.num_samples=1"])
    with pytest.raises(ConfigError, match="out of range; the list has 2 entries"):
        apply_overrides(raw, ["metrics.2.num_samples=1"])


def test_set_on_a_list_entry_reaches_the_resolved_experiment():
    from core import config

    exp = config.load("experiments/rectified_flow_2d.toml", ["metrics.1.projections=123"])
    assert exp.metrics[1]["plugin"] == "sliced_wasserstein" and exp.metrics[1]["projections"] == 123


def test_a_project_folder_with_its_own_core_package_still_runs_flowforge(tmp_path):
    """The README's coexistence rule: the console script does not put the working folder on sys.path."""
    import os
    import shutil
    import subprocess

    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("raise ImportError('the project\\'s own core package')\n")
    script = shutil.which("flowforge")
    assert script is not None, "the flowforge console script is installed by pip install -e ."
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([script, "plugins"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "solver:ode" in done.stdout, done.stderr
    shadowed = subprocess.run([os.sys.executable, "-m", "core.run", "--help"], cwd=tmp_path, capture_output=True,
                              text=True, env=env, timeout=120)
    assert shadowed.returncode != 0 and "own core package" in shadowed.stderr  # why the README says: use `flowforge run`


def _tiny_run(tmp_path, *extra):
    from core.run import main
    from tests.conftest import RF2D, TINY_RF2D

    out = tmp_path / "run"
    args = [str(RF2D), "--out", str(out), "--overwrite", *(a for kv in (*TINY_RF2D, *extra) for a in ("--set", kv))]
    assert main(args) == 0
    return out, args


def test_resume_asking_fewer_steps_than_the_checkpoint_is_an_error(tmp_path, capsys):
    from core.run import main

    out, args = _tiny_run(tmp_path)
    capsys.readouterr()
    resumed = [a if a != "--overwrite" else "--resume" for a in args] + ["--set", "trainer.steps=10"]
    assert main(resumed) == 2
    err = capsys.readouterr().err
    assert "trainer.steps" in err and "already at step 20" in err and "Traceback" not in err


def test_a_checkpoint_model_mismatch_names_the_mismatched_parameters(tmp_path, capsys):
    from core.run import main

    out, args = _tiny_run(tmp_path)
    capsys.readouterr()
    resumed = [a if a != "--overwrite" else "--resume" for a in args] + ["--set", "backbone.hidden=48",
                                                                         "--set", "trainer.steps=30"]
    assert main(resumed) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "size mismatch for" in err and "torch.Size([48" in err, err


def test_evaluation_phases_and_resume_are_announced(tmp_path, capsys):
    from core.run import main

    out, args = _tiny_run(tmp_path)
    err = capsys.readouterr().err
    order = ["computing the data floor (64 samples", "computing the data floor: done in",
             "evaluating the untrained model (64 samples", "evaluating the untrained model: done in",
             "train 20/20", "evaluating the trained model (64 samples", "evaluating the trained model: done in"]
    positions = [err.find(text) for text in order]
    assert -1 not in positions and positions == sorted(positions), err
    resumed = [a if a != "--overwrite" else "--resume" for a in args] + ["--set", "trainer.steps=25"]
    assert main(resumed) == 0
    printed = capsys.readouterr()
    assert "resumed from step 20" in printed.out
    assert "untrained model" not in printed.err and "evaluating the trained model" in printed.err
