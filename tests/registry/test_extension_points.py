"""The extension points beyond components: plugin-declared kinds, trainer events, loggers, commands.

The proof: a third-party package written into tmp_path at test time (a module and a
``*.dist-info`` folder, found through importlib.metadata like a pip-installed package)
adds a kind ``probe`` (section ``[probe]``, built with ``spec``, asked for by name by
its own metric), trainer-event hooks (a file per event), a CSV logger and a command
``flowforge hello RUN``; nothing in flowforge names it.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import registry
from core import config as config_mod
from core.build import Step, run_steps
from core.events import EVENTS, Events
from registry import ConfigError, PluginError, Registry, hookimpl

from ..conftest import TINY_RF2D

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "experiments" / "rectified_flow_2d.toml"

PROBE_PACKAGE = '''
"""flowforge-probe: a third-party plugin using every extension point."""
import csv
import json
import os
from pathlib import Path

import attrs

from registry import hookimpl

FLOWFORGE_API = 1


@attrs.define
class ProbeConfig:
    label: str = "probe"
    scale: float = 1.0


class Probe:
    def __init__(self, config, spec):
        self.label, self.scale, self.dim = config.label, config.scale, spec.shape[0]


class ProbeMetric:
    def __init__(self, probe):
        self.probe = probe

    def evaluate(self, model, data, generator):
        return {"scaled_dim": self.probe.scale * self.probe.dim}


class CsvLogger:
    def __init__(self, run_dir):
        self.file = open(Path(run_dir) / "log.csv", "a", newline="")
        self.writer = csv.writer(self.file)

    def log(self, step, values):
        for key, value in values.items():
            self.writer.writerow([step, key, value])

    def close(self):
        self.file.close()


def _event(name, line):
    with open(Path(os.environ["PROBE_EVENTS"]) / f"{name}.txt", "a") as fh:
        fh.write(f"{line}\\n")


@hookimpl
def flowforge_register_kinds(register_kind):
    register_kind("probe", needs=("spec",), doc="a probe of the data's shape")


@hookimpl
def flowforge_register(register):
    register("probe", "dim_probe", Probe, ProbeConfig, doc="remembers the data dimension")
    register("metric", "probe_metric", ProbeMetric, doc="scale x dimension, from the probe")
    register("logger", "csv", CsvLogger, doc="every record as rows of log.csv")


@hookimpl
def flowforge_run_start(trainer):
    probe = trainer.components.extras["probe"]
    _event("run_start", f"{trainer.step} {probe.label} {probe.dim}")


@hookimpl
def flowforge_step_end(trainer, step, logs):
    _event("step_end", step)


@hookimpl
def flowforge_evaluated(trainer, step, results):
    _event("evaluated", f"{step} {json.dumps(results, sort_keys=True)}")


@hookimpl
def flowforge_checkpoint_written(trainer, step, path):
    _event("checkpoint_written", f"{step} {Path(path).name} {Path(path).exists()}")


@hookimpl
def flowforge_run_end(trainer, summary):
    _event("run_end", summary["steps"])


def _add_arguments(parser):
    parser.add_argument("run")


def _hello(args):
    summary = json.loads((Path(args.run) / "summary.json").read_text())
    print(f"hello from {summary['experiment']}: {summary['steps']} steps")
    return 0


@hookimpl
def flowforge_register_commands(register):
    register("hello", "greet a finished run", _add_arguments, _hello)
'''

PROBE_SECTIONS = '''
[probe]
plugin = "dim_probe"
label = "shape"
scale = 2.0

[[metrics]]
plugin = "probe_metric"

[[loggers]]
plugin = "csv"
'''


@pytest.fixture(scope="module")
def probe_site(tmp_path_factory) -> Path:
    """A site folder holding the installed-looking distribution flowforge-probe."""
    site = tmp_path_factory.mktemp("site")
    (site / "flowforge_probe.py").write_text(PROBE_PACKAGE)
    info = site / "flowforge_probe-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flowforge-probe\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[flowforge.plugins]\nprobe = flowforge_probe\n")
    return site


def _env(site: Path, events: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (registry.ENV_VAR, registry.MODULES_ENV_VAR)}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), OMP_NUM_THREADS="1")
    if events is not None:
        env["PROBE_EVENTS"] = str(events)
    return env


def _python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _experiment(tmp: Path, extra: str = PROBE_SECTIONS) -> Path:
    path = tmp / "probe.toml"
    path.write_text(EXPERIMENT.read_text() + extra)
    return path


def _sets(*extra: str) -> list[str]:
    return sum((["--set", s] for s in (*TINY_RF2D, "trainer.checkpoint_every=10", "eval.every=10", *extra)), [])


@pytest.fixture(scope="module")
def probe_run(probe_site, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe_run")
    events = tmp / "events"
    events.mkdir()
    out = tmp / "run"
    proc = _python(["-m", "core.run", str(_experiment(tmp)), *_sets(), "--out", str(out)], _env(probe_site, events))
    assert proc.returncode == 0, proc.stderr
    return out, events


def _lines(events: Path, name: str) -> list[str]:
    return (events / f"{name}.txt").read_text().splitlines()


# --------------------------------------------------------------------------- the third-party package
def test_the_declared_kind_is_built_and_given_to_the_metric(probe_run):
    out, events = probe_run
    assert _lines(events, "run_start") == ["0 shape 2"]  # built with spec (2-D data), found by the hook
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["probe_metric/scaled_dim"] == 4.0  # the metric asked for `probe` by name


def test_config_toml_holds_the_resolved_new_section(probe_run):
    out, _ = probe_run
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["probe"] == {"plugin": "dim_probe", "label": "shape", "scale": 2.0}
    assert written["loggers"] == [{"plugin": "csv"}]
    assert {"plugin": "probe_metric"} in written["metrics"]


def test_every_trainer_event_fired(probe_run):
    _, events = probe_run
    assert _lines(events, "step_end") == [str(s) for s in range(1, 21)]
    assert _lines(events, "checkpoint_written") == ["10 step-00000010.pt True", "20 step-00000020.pt True"]
    evaluated = [line.split(" ", 1) for line in _lines(events, "evaluated")]
    assert [step for step, _ in evaluated] == ["10", "20"]
    assert json.loads(evaluated[-1][1])["probe_metric/scaled_dim"] == 4.0
    assert _lines(events, "run_end") == ["20"]


def test_the_logger_got_every_metrics_record(probe_run):
    out, _ = probe_run
    rows = list(csv.reader((out / "log.csv").open()))
    losses = [int(step) for step, key, _ in rows if key == "loss"]
    assert losses == [5, 10, 15, 20]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len({int(r[0]) for r in rows}) == len({r["step"] for r in jsonl})  # metrics.jsonl is still written
    assert any(key == "eval/probe_metric/scaled_dim" for _, key, _ in rows)


def test_the_plugin_command_runs_and_is_listed(probe_run, probe_site):
    out, _ = probe_run
    env = _env(probe_site)
    hello = _python(["-m", "core.cli", "hello", str(out)], env)
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout.strip() == "hello from rectified-flow-checkerboard: 20 steps"
    helptext = _python(["-m", "core.cli", "--help"], env)
    assert "hello" in helptext.stdout and "greet a finished run" in helptext.stdout
    listing = _python(["-m", "core.cli", "plugins"], env)
    assert listing.returncode == 0, listing.stderr
    assert "flowforge-probe 0.1.0" in listing.stdout
    assert "kind:probe  section [probe], needs spec; provides 'probe'" in listing.stdout
    assert "command:hello  greet a finished run" in listing.stdout
    assert "logger:csv" in listing.stdout and "probe:dim_probe" in listing.stdout


def test_a_misspelt_key_in_the_new_section_exits_2_and_writes_nothing(probe_site, tmp_path):
    file = _experiment(tmp_path, PROBE_SECTIONS.replace("scale = 2.0", "scael = 2.0"))
    out = tmp_path / "run"
    proc = _python(["-m", "core.run", str(file), *_sets(), "--out", str(out)], _env(probe_site, tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "probe.scael" in proc.stderr and 'did you mean "scale"' in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_misspelt_section_suggests_the_new_one(probe_site, tmp_path):
    file = _experiment(tmp_path, PROBE_SECTIONS.replace("[probe]", "[prob]"))
    proc = _python(["-m", "core.run", str(file), *_sets(), "--out", str(tmp_path / "run")], _env(probe_site, tmp_path))
    assert proc.returncode == 2 and 'did you mean "probe"' in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- trainer events, in process
class Recorder:
    """Implements every trainer event and records (event, step) in order."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    @hookimpl
    def flowforge_run_start(self, trainer):
        self.calls.append(("run_start", trainer.step))

    @hookimpl
    def flowforge_step_end(self, trainer, step, logs):
        assert trainer.step == step and hasattr(logs, "items")
        self.calls.append(("step_end", step))

    @hookimpl
    def flowforge_evaluated(self, trainer, step, results):
        assert "energy_distance" in results
        self.calls.append(("evaluated", step))

    @hookimpl
    def flowforge_checkpoint_written(self, trainer, step, path):
        assert Path(path).is_file()
        self.calls.append(("checkpoint_written", step))

    @hookimpl
    def flowforge_run_end(self, trainer, summary):
        self.calls.append(("run_end", summary["steps"]))


def _tiny_run(tmp_path, *extra: str) -> dict:
    from core.run import run

    return run(EXPERIMENT, [*TINY_RF2D, "trainer.checkpoint_every=5", "eval.every=10", "eval.untrained=false",
                            "eval.floor=false", *extra], out=tmp_path / "run")


def test_event_order_and_counts(tmp_path):
    recorder = Recorder()
    with registry.temporary_plugin(recorder, name="recorder"):
        _tiny_run(tmp_path)
    names = [name for name, _ in recorder.calls]
    assert names[0] == "run_start" and names[-1] == "run_end" and recorder.calls[0] == ("run_start", 0)
    assert [s for n, s in recorder.calls if n == "step_end"] == list(range(1, 21))  # once per optimizer step
    assert [s for n, s in recorder.calls if n == "checkpoint_written"] == [5, 10, 15, 20]  # once per checkpoint
    assert [s for n, s in recorder.calls if n == "evaluated"] == [10, 20]
    assert recorder.calls[-1] == ("run_end", 20)
    step_10 = recorder.calls.index(("step_end", 10))
    assert recorder.calls[step_10 + 1:step_10 + 3] == [("evaluated", 10), ("checkpoint_written", 10)]


def test_events_nobody_implements_are_none():
    events = Events(trainer=object())
    for event in EVENTS:
        assert getattr(events, event) is None
    events("step_end", step=1, logs={})  # a no-op
    with registry.temporary_plugin(Recorder(), name="recorder_on"):
        on = Events(trainer=object())
        off = Events(trainer=object(), enabled=False)  # other ranks
    assert all(getattr(on, e) is not None for e in EVENTS) and all(getattr(off, e) is None for e in EVENTS)


# --------------------------------------------------------------------------- declared kinds, in process
class KindPlugin:
    """Declares kinds from `specs` and one component per kind (each records its context)."""

    def __init__(self, *specs: dict):
        self.specs = specs

    @hookimpl
    def flowforge_register_kinds(self, register_kind):
        for spec in self.specs:
            register_kind(**spec)

    @hookimpl
    def flowforge_register(self, register):
        for spec in self.specs:
            register(spec["name"], "thing", _thing_factory(spec.get("needs", ())), None)


def _thing_factory(needs):
    namespace: dict = {}
    exec(f"def make({', '.join(needs)}):\n    return {{{', '.join(f'{n!r}: {n}' for n in needs)}}}", namespace)
    return namespace["make"]


def _raw(**extra) -> dict:
    raw = config_mod.read_toml(EXPERIMENT)
    raw.update(extra)
    return raw


def test_a_required_kind_and_a_list_kind(tmp_path):
    plugin = KindPlugin({"name": "gauge", "required": True, "needs": ("spec", "data")},
                        {"name": "hook", "section": "hooks", "many": True, "needs": ("gauge",)})
    with registry.temporary_plugin(plugin, name="kinds"):
        with pytest.raises(ConfigError, match=r"missing required section \[gauge\].*installed: thing"):
            config_mod.resolve(_raw())
        exp = config_mod.resolve(_raw(gauge={"plugin": "thing"}, hooks=[{"plugin": "thing"}, {"plugin": "thing"}]))
        assert exp.to_dict()["hooks"] == [{"plugin": "thing"}] * 2 and exp.to_dict()["gauge"] == {"plugin": "thing"}
        with pytest.raises(ConfigError, match=r"expected a list of tables \(\[\[hooks\]\]\)"):
            config_mod.resolve(_raw(gauge={"plugin": "thing"}, hooks={"plugin": "thing"}))
        from core.build import build_components

        built = build_components(exp)
        gauge = built.extras["gauge"]
        assert set(gauge) == {"spec", "data"} and gauge["spec"] is built.spec
        assert built.extras["hook"] == [{"gauge": gauge}] * 2  # built after what it needs


def test_a_kind_may_not_take_a_builtin_section_or_name():
    for spec in ({"name": "solver"}, {"name": "probe2", "section": "trainer"}):
        with registry.temporary_plugin(KindPlugin(spec), name="clash"):
            with pytest.raises(PluginError, match="flowforge itself defines"):
                config_mod.resolve(_raw())


def test_two_plugins_declaring_one_kind_name_both_distributions():
    reg = Registry()
    reg._loaded = True
    reg.add_plugin(KindPlugin({"name": "gauge"}), name="one", distribution="dist-one")
    with pytest.raises(PluginError, match="kind 'gauge' is declared twice: by distribution 'dist-one'.*'dist-two'"):
        reg.add_plugin(KindPlugin({"name": "gauge", "section": "other"}), name="two", distribution="dist-two")
    assert [k.name for k in reg.declared_kinds()] == ["gauge"] and reg.available("gauge") == ["thing"]


def test_a_bad_declaration_is_reported_and_skipped(capsys):
    reg = Registry()
    reg._loaded = True
    with pytest.raises(PluginError, match="flowforge_register_kinds hook raised.*identifier"):
        reg.add_plugin(KindPlugin({"name": "no good"}), name="bad", distribution="dist-bad")
    assert reg.declared_kinds() == [] and reg.plugins() == []


def test_build_order_follows_needs_and_reports_cycles_and_unknown_names():
    made = []

    def step(name, *needs):
        return Step(name, needs, lambda c: made.append(name) or {name: True})

    run_steps([step("a", "b"), step("b"), step("c", "a")])
    assert made == ["b", "a", "c"]
    with pytest.raises(ConfigError, match=r"b: cannot be built: it needs 'spce' \(did you mean \"spec\"\?\), which nothing"):
        run_steps([step("spec"), step("b", "spce")])
    with pytest.raises(ConfigError, match=r"waits on \[y\] \(a cycle\)"):
        run_steps([step("x", "y"), step("y", "x")])


def test_a_builtin_factory_asking_for_a_plugin_kind_is_built_after_it(monkeypatch):
    seen = {}

    class ObjectivePlugin(KindPlugin):
        @hookimpl
        def flowforge_register(self, register):
            register("gauge", "thing", _thing_factory(("spec",)), None)
            base = registry.get("objective", "velocity_mse")

            def make(config, spec, scheduler, path, gauge):
                seen["gauge"] = gauge
                factory = base.factory()
                offered = {"spec": spec, "scheduler": scheduler, "path": path}
                return factory(config, **{k: v for k, v in offered.items() if k in inspect.signature(factory).parameters})

            register("objective", "gauged", make, base.config_ref)

    with registry.temporary_plugin(ObjectivePlugin({"name": "gauge", "needs": ("spec",)}), name="gauged"):
        raw = _raw(gauge={"plugin": "thing"})
        raw["objective"] = {**raw["objective"], "plugin": "gauged"}
        from core.build import build_components

        built = build_components(config_mod.resolve(raw))
    assert seen["gauge"] is built.extras["gauge"] and seen["gauge"]["spec"] is built.spec


# --------------------------------------------------------------------------- commands and loggers, in process
def test_plugin_command_from_a_temporary_plugin(capsys):
    from core.cli import main

    class Commands:
        @hookimpl
        def flowforge_register_commands(self, register):
            register("shout", "print loudly", lambda p: p.add_argument("word"), lambda a: print(a.word.upper()) or 3)
            register("run", "shadows a built-in", lambda p: None, lambda a: 0)

    with registry.temporary_plugin(Commands(), name="commands"):
        assert main(["shout", "hi"]) == 3
        assert capsys.readouterr().out.strip() == "HI"
        assert main(["shuot"]) == 2
        err = capsys.readouterr().err
        assert 'did you mean "shout"' in err and "has the name of a built-in command" in err
    assert main(["shout", "hi"]) == 2


def test_tensorboard_logger_needs_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails like a missing package
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        registry.build("logger", {"plugin": "tensorboard"}, run_dir=tmp_path)


def test_tensorboard_logger_writes_numbers(monkeypatch, tmp_path):
    import types

    from core.rundir import RunDir

    written = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            written.append((self.logdir, tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append("closed")

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    rd = RunDir(tmp_path)
    rd.loggers = [registry.build("logger", {"plugin": "tensorboard"}, run_dir=tmp_path)]
    rd.log({"step": 5, "loss": 0.5, "loss_bin/0": 0.7, "note": "text", "flag": True})
    rd.log({"step": 10, "eval/frechet_distance": 3.0})
    rd.close_loggers()
    logdir = str(tmp_path / "tensorboard")
    assert written == [(logdir, "loss", 0.5, 5), (logdir, "loss_bin/0", 0.7, 5),
                       (logdir, "eval/frechet_distance", 3.0, 10), "closed"]
    assert len(rd.read_metrics()) == 2 and rd.loggers == []
