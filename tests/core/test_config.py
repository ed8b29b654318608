"""Strict configuration: every error names the file, the key path, what was expected and the nearest key;
exit status 2 and no traceback."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from core import config
from core.run import main
from registry import ConfigError

from ..conftest import RF2D, run_cli


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def rf2d_text(**replace: str) -> str:
    text = RF2D.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def run_main(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"steps = 3000": "stepz = 3000"}, ["trainer.stepz", "unknown key", 'did you mean "steps"']),
        ({"lr = 1e-2": "lr = \"fast\""}, ["trainer.lr", "expected a number", "'fast'"]),
        ({"steps = 3000": "steps = 3000.5"}, ["trainer.steps", "expected an integer", "3000.5"]),
        ({"method = \"midpoint\"": "method = \"midpiont\""}, ["solver.method", "one of", 'did you mean "midpoint"']),
        ({"plugin = \"mlp\"": "plugin = \"mpl\""}, ["backbone", "unknown backbone plugin 'mpl'", 'did you mean "mlp"', "installed:"]),
        ({"hidden = 256": "hiden = 256"}, ["backbone.hiden", 'did you mean "hidden"']),
        ({"[trainer]": "[trainr]"}, ["trainr", "unknown section", 'did you mean "trainer"']),
        ({"[data]\nplugin = \"toy2d\"": "[data]"}, ["data.plugin", "missing required key 'plugin'", "toy2d"]),
        ({"ema_decay = 0.995": "ema_decay = 1.5"}, ["trainer.ema_decay", "[0, 1)"]),
    ],
)
def test_config_errors_are_clear_and_exit_2(tmp_path, capsys, edit, expected):
    path = write(tmp_path, rf2d_text(**edit))
    code, err = run_main(capsys, path, "--out", tmp_path / "run")
    assert code == 2
    assert str(path) in err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_required_option_of_a_plugin(tmp_path, capsys):
    import attrs

    import registry
    from registry import hookimpl

    @attrs.define
    class NeedsPath:
        """Options.

        Attributes:
            root: where the data lives.
        """

        root: str

    class Plugin:
        @hookimpl
        def flowforge_register(self, register):
            register("data", "needs_root", lambda config: None, NeedsPath)

    with registry.temporary_plugin(Plugin(), name="needs_root_plugin"):
        path = write(tmp_path, rf2d_text(**{"plugin = \"toy2d\"\ndataset = \"checkerboard\"": "plugin = \"needs_root\""}))
        code, err = run_main(capsys, path)
    assert code == 2 and "data.root" in err and "required key missing" in err and "a string" in err


def test_toml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = write(tmp_path, "[trainer\nsteps = 1\n")
    code, err = run_main(capsys, path)
    assert code == 2 and str(path) in err and "line 1" in err


def test_missing_file(tmp_path, capsys):
    code, err = run_main(capsys, tmp_path / "nope.toml")
    assert code == 2 and "experiment file not found" in err


def test_set_overrides_are_validated_like_the_file(capsys, tmp_path):
    code, err = run_main(capsys, RF2D, "--set", "trainer.stesp=5", "--out", tmp_path / "r")
    assert code == 2 and "trainer.stesp" in err and 'did you mean "steps"' in err
    code, err = run_main(capsys, RF2D, "--set", "trainer.steps=many", "--out", tmp_path / "r")
    assert code == 2 and "trainer.steps" in err and "expected an integer" in err
    code, err = run_main(capsys, RF2D, "--set", "trainer", "--out", tmp_path / "r")
    assert code == 2 and "KEY=VALUE" in err


def test_override_values_are_parsed_as_toml():
    raw = config.apply_overrides({"trainer": {"steps": 1}}, ["trainer.steps=7", "trainer.betas=[0.9, 0.95]",
                                                             "solver.method=euler", "eval.use_ema=false"])
    assert raw["trainer"] == {"steps": 7, "betas": [0.9, 0.95]}
    assert raw["solver"] == {"method": "euler"} and raw["eval"] == {"use_ema": False}


def test_resolved_config_has_every_default_and_runs_again_as_is(tmp_path, tiny_rf2d):
    from core.run import run

    run(RF2D, tiny_rf2d, out=tmp_path / "a")
    written = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert written["trainer"]["steps"] == 20 and written["trainer"]["grad_accum"] == 1
    assert {k: written["solver"][k] for k in ("plugin", "method", "steps")} == {"plugin": "ode", "method": "midpoint", "steps": 4}
    assert written["launcher"] == {"plugin": "local", "device": "auto"}
    summary = run(tmp_path / "a" / "config.toml", out=tmp_path / "b")
    again = tomllib.loads((tmp_path / "b" / "config.toml").read_text())
    assert again == written
    assert summary["steps"] == 20


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    path = write(tmp_path, rf2d_text(**{"steps = 3000": "stepz = 3000"}))
    proc = run_cli(["-m", "core.run", str(path)])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "trainer.stepz" in proc.stderr


def test_structure_error_paths_for_nested_lists():
    import attrs

    from registry import structure

    @attrs.define
    class C:
        sizes: tuple[int, ...] = (1,)

    with pytest.raises(ConfigError) as err:
        structure({"sizes": [1, "two"]}, C, ("backbone",))
    assert str(err.value).startswith("backbone.sizes[1]: expected an integer")


def test_stages_run_in_order_and_substitute_previous(tmp_path, tiny_rf2d):
    from core.run import run

    text = RF2D.read_text() + '\n[[stages]]\nname = "first"\n\n[[stages]]\nname = "second"\nset = { "experiment.description" = "after {previous}", "trainer.steps" = 10 }\n'
    path = write(tmp_path, text)
    summary = run(path, tiny_rf2d, out=tmp_path / "staged")
    assert [s["steps"] for s in summary["stages"]] == [20, 10]
    second = tomllib.loads((tmp_path / "staged" / "1-second" / "config.toml").read_text())
    assert second["experiment"]["description"] == f"after {tmp_path / 'staged' / '0-first'}"
