"""The bad-input table: mutations of the real experiments, each refused by ``python -m core.run``.

Every case takes one experiment of ``experiments/`` (resolved, every default
filled in), changes one thing (a NaN or an infinity in a float option, a wrong
type, a zero or negative size, a misspelt key, an unknown plugin name, an
option that contradicts the data, ...) and runs it the way ``python -m core.run``
does. Each must exit with status 2, print the key path of the problem, print no
traceback and leave nothing in ``--out``.

Most cases go through `core.run.main` in this process (the same code path as
the command line, with stderr captured); training is replaced by a failure, so
a case that is not refused shows up as "training started" instead of a
minutes-long run. A handful run as real subprocesses, in parallel.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(glob.glob(str(ROOT / "experiments" / "*.toml")))
NAN, INF = float("nan"), float("inf")


@attrs.define
class Case:
    """One row of the table: experiment, mutation, and the key path the message must name."""

    id: str
    experiment: str
    key: str                                   # key path the message must contain
    mutate: Callable[[dict], None] | None = None
    extra_args: list[str] = attrs.Factory(list)
    setup: Callable[[Path, dict], str] | None = None   # writes the file itself, returns its path


# --------------------------------------------------------------------------- the experiments, resolved
def _resolved() -> dict[str, dict]:
    from core import config

    out = {}
    for path in EXPERIMENTS:
        raw = config.read_toml(path)
        base, stages = config.split_stages(raw, path)
        if stages:
            base = config.stage_config(base, stages[0], None)
        out[Path(path).stem] = config.resolve(base, file=path).to_dict()
    return out


def _leaves(node: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every scalar leaf; list-of-table items are addressed by index."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, (*path, i))]
    return [(path, node)]


def key_text(path: tuple) -> str:
    """("metrics", 1, "atol") -> "metrics[1].atol" (the runner's spelling)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def setter(path: tuple, value: Any) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        node = cfg
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return mutate


def deleter(path: tuple) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        node = cfg
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
    return mutate


def renamer(path: tuple, new: str) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        node = cfg
        for part in path[:-1]:
            node = node[part]
        node[new] = node.pop(path[-1])
    return mutate


def _plugin_of(cfg: dict, path: tuple) -> str:
    """The plugin of the innermost section holding `path`."""
    node, plugin = cfg, ""
    for part in path[:-1]:
        node = node[part]
        if isinstance(node, dict) and isinstance(node.get("plugin"), str):
            plugin = node["plugin"]
    return plugin


def _typo(word: str) -> str:
    """A plausible misspelling: two neighbouring letters swapped (or the last one doubled)."""
    for i in range(len(word) - 1):
        if word[i] != word[i + 1] and word[i].isalpha() and word[i + 1].isalpha():
            return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word + word[-1]


# --------------------------------------------------------------------------- the table
def generated_cases(resolved: dict[str, dict]) -> list[Case]:
    """Cases generated from every experiment's leaves: non-finite floats, wrong types, typos, unknown plugins."""
    cases: list[Case] = []
    seen: set[tuple[str, str]] = set()

    for name, cfg in resolved.items():
        def first(kind: str, path: tuple, cfg=cfg) -> bool:
            # one case per distinct key path and plugin, not one per experiment that repeats it
            marker = (kind, key_text(path), _plugin_of(cfg, path))
            if marker in seen:
                return False
            seen.add(marker)
            return True

        for path, value in _leaves(cfg):
            if value is None:  # a default left out of the file
                continue
            key = key_text(path)
            if isinstance(value, bool):
                if first("type", path):
                    cases.append(Case(f"{name}:{key}=str", name, key, setter(path, "yes")))
            elif isinstance(value, float):
                if first("nan", path):
                    cases.append(Case(f"{name}:{key}=nan", name, key, setter(path, NAN)))
                if first("inf", path):
                    sign = -1.0 if len(seen) % 2 else 1.0
                    cases.append(Case(f"{name}:{key}={sign * INF}", name, key, setter(path, sign * INF)))
            elif isinstance(value, int):
                if first("type", path):
                    cases.append(Case(f"{name}:{key}=str", name, key, setter(path, "12")))
            elif isinstance(value, str) and path[-1] == "plugin":
                if first("plugin", path):
                    cases.append(Case(f"{name}:{key}=typo", name, key, setter(path, _typo(value))))
            elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value) \
                    and not all(isinstance(v, bool) for v in value):
                if first("list", path):
                    bad = [NAN] * len(value) if isinstance(value[0], float) else ["x"] * len(value)
                    cases.append(Case(f"{name}:{key}=bad-list", name, key, setter(path, bad)))
            if path[-1] != "plugin" and first("typo", path[:-1] + ("*",)):
                new = _typo(str(path[-1]))
                if new != path[-1]:
                    cases.append(Case(f"{name}:{key}->{new}", name, key_text((*path[:-1], new)),
                                      renamer(path, new)))
    return cases


def _non_utf8(tmp: Path, cfg: dict) -> str:
    path = tmp / "latin1.toml"
    text = tomli_w.dumps(cfg).replace('name = "', 'name = "caf\xe9 ', 1)
    path.write_bytes(text.encode("latin-1"))
    return str(path)


def _typo_section(tmp: Path, cfg: dict) -> str:
    cfg = dict(cfg)
    cfg["trainr"] = cfg.pop("trainer")
    path = tmp / "typo_section.toml"
    path.write_text(tomli_w.dumps(cfg))
    return str(path)


def _bad_toml(tmp: Path, cfg: dict) -> str:
    path = tmp / "broken.toml"
    path.write_text(tomli_w.dumps(cfg) + "\n[trainer\nsteps = 3\n")
    return str(path)


SIZE_CASES: list[tuple[str, tuple, Any]] = [
    # sizes that cannot build a model, or that make a metric or solver meaningless
    ("rectified_flow_2d", ("backbone", "hidden"), 0),
    ("rectified_flow_2d", ("backbone", "depth"), -1),
    ("rectified_flow_2d", ("backbone", "time_dim"), 0),
    ("rectified_flow_2d", ("backbone", "token_dim"), 0),
    ("rectified_flow_2d", ("backbone", "out_channels_mult"), 0),
    ("rectified_flow_2d", ("backbone", "time_scale"), INF),
    ("rectified_flow_2d", ("metrics", 1, "projections"), 0),
    ("rectified_flow_2d", ("solver", "t0"), NAN),
    ("rectified_flow_2d", ("solver", "steps"), 0),
    ("rectified_flow_2d", ("eval", "num_samples"), 0),
    ("rectified_flow_2d", ("eval", "num_samples"), -1),
    ("rectified_flow_2d", ("eval", "batch_size"), 0),
    ("rectified_flow_2d", ("eval", "every"), -1),
    ("rectified_flow_2d", ("eval", "samples_every"), -5),
    ("rectified_flow_2d", ("eval", "num_pictures"), -1),
    ("rectified_flow_2d", ("trainer", "lr"), INF),
    ("rectified_flow_2d", ("trainer", "weight_decay"), INF),
    ("rectified_flow_2d", ("trainer", "weight_decay"), -0.1),
    ("rectified_flow_2d", ("trainer", "min_lr_ratio"), NAN),
    ("rectified_flow_2d", ("trainer", "min_lr_ratio"), 1.5),
    ("rectified_flow_2d", ("trainer", "betas"), [NAN, 0.999]),
    ("rectified_flow_2d", ("trainer", "betas"), [0.9, 1.0]),
    ("rectified_flow_2d", ("trainer", "betas"), [-0.1, 0.999]),
    ("rectified_flow_2d", ("trainer", "eps"), 0.0),
    ("rectified_flow_2d", ("trainer", "batch_size"), 0),
    ("rectified_flow_2d", ("trainer", "steps"), -1),
    ("rectified_flow_2d", ("trainer", "monitor"), "energy_distanse"),
    ("rectified_flow_2d", ("trainer", "monitor"), "sliced_wasserstein/nope"),
    ("rectified_flow_2d", ("objective", "mean"), NAN),
    ("rectified_flow_2d", ("objective", "std"), 0.0),
    ("rectified_flow_2d", ("objective", "label_dropout"), 0.1),
    ("rectified_flow_2d", ("eval", "guidance_scale"), 2.0),
    ("rectified_flow_2d", ("data", "noise"), NAN),
    ("rectified_flow_2d", ("data", "noise"), -1.0),
    ("rectified_flow_2d", ("data", "dataset"), "checkerbord"),
    ("rectified_flow_2d", ("experiment", "seed"), 1.5),
    ("rectified_flow_2d", ("experiment", "name"), 7),
    ("rf_digits", ("data", "held_out_fraction"), 1.5),
    ("rf_digits", ("backbone", "hidden"), -3),
    ("rf_digits_unet", ("backbone", "model_channels"), 0),
    ("rf_digits_unet", ("backbone", "channel_mult"), []),
    ("rf_digits_unet", ("backbone", "dropout"), 1.0),
    ("rf_digits_dit", ("backbone", "depth"), 0),
    ("rf_digits_dit", ("backbone", "patch_size"), 0),
    ("rf_digits_dit", ("backbone", "hidden_size"), -1),
    ("ddpm_digits", ("path", "steps"), 0),
    ("ddpm_digits", ("solver", "steps"), 0),
    ("discrete_flow_2d", ("solver", "steps"), 0),
    ("discrete_flow_2d", ("scheduler", "n"), NAN),
    ("discrete_flow_2d", ("data", "bins"), 0),
    ("tinyclip_distill", ("backbone", "vision_width"), -1),
    ("tinyclip_distill", ("backbone", "text_depth"), -1),
    ("likelihood_2d", ("metrics", 1, "rtol"), -1.0),
    ("rectified_flow_2d", ("launcher", "device"), "cuda"),
]


def special_cases(resolved: dict[str, dict]) -> list[Case]:
    cases = []
    for name, path, value in SIZE_CASES:
        assert name in resolved, name
        cases.append(Case(f"special {name}:{key_text(path)}={value!r}", name, key_text(path), setter(path, value)))
    cases += [
        Case("unknown section", "rectified_flow_2d", "trainr", setup=_typo_section),
        Case("not TOML", "rectified_flow_2d", "broken.toml", setup=_bad_toml),
        Case("not UTF-8", "rectified_flow_2d", "latin1.toml", setup=_non_utf8),
        Case("missing data section", "rectified_flow_2d", "data", deleter(("data",))),
        Case("missing plugin key", "rectified_flow_2d", "solver.plugin", deleter(("solver", "plugin"))),
        Case("--set typo", "rectified_flow_2d", "trainer.stepz", extra_args=["--set", "trainer.stepz=3"]),
        Case("--set bad value", "rectified_flow_2d", "trainer.lr", extra_args=["--set", "trainer.lr=inf"]),
        Case("--set not key=value", "rectified_flow_2d", "--set", extra_args=["--set", "trainer.lr"]),
    ]
    return cases


# --------------------------------------------------------------------------- running a case
@pytest.fixture(scope="module")
def resolved() -> dict[str, dict]:
    return _resolved()


def _write_case(case: Case, resolved: dict[str, dict], tmp: Path) -> str:
    cfg = _without_none(copy.deepcopy(resolved[case.experiment]))
    if case.setup is not None:
        return case.setup(tmp, cfg)
    if case.mutate is not None:
        case.mutate(cfg)
    path = tmp / f"{case.experiment}.toml"
    path.write_text(tomli_w.dumps(cfg))
    return str(path)


def _without_none(value: Any) -> Any:
    """TOML has no null: None-valued keys (defaults) are left out, as in a run's config.toml."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value]
    return value


class TrainingStarted(AssertionError):
    """Raised instead of training: the case got past validation and building."""


def run_in_process(argv: list[str]) -> tuple[int | str, str]:
    """(exit status or the escaped exception, stderr) of ``python -m core.run ARGV``."""
    from core import run

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status: int | str = run.main(argv)
        except SystemExit as exc:  # argparse
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - a traceback the user would have seen
            status = f"{type(exc).__name__}: {exc}"
    return status, err.getvalue()


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from core import trainer

    def refuse(self: Any) -> None:
        raise TrainingStarted("training started: the bad value was not refused")

    monkeypatch.setattr(trainer.Trainer, "fit", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "cuda" must be refused on every machine


def check(case: Case, status: int | str, stderr: str, out: Path) -> None:
    assert status == 2, f"{case.id}: exit {status!r}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert case.key in stderr, f"{case.id}: the message does not name {case.key!r}:\n{stderr}"
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert not leftovers, f"{case.id}: wrote {leftovers} into --out"


def _all_cases() -> list[Case]:
    resolved = _resolved()
    return generated_cases(resolved) + special_cases(resolved)


_CASES: list[Case] | None = None


def table() -> list[Case]:
    global _CASES
    if _CASES is None:
        _CASES = _all_cases()
    return _CASES


def test_table_is_large() -> None:
    assert len(table()) >= 128
    assert len({c.id for c in table()}) == len(table())


def test_bad_inputs_in_process(resolved: dict[str, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row of the table, through `core.run.main`; the failures are listed together."""
    _no_training(monkeypatch)
    failures, durations = [], []
    for index, case in enumerate(table()):
        tmp = tmp_path / f"case{index}"
        tmp.mkdir()
        file = _write_case(case, resolved, tmp)
        out = tmp / "out"
        started = time.perf_counter()
        status, stderr = run_in_process([file, "--out", str(out), *case.extra_args])
        durations.append((time.perf_counter() - started, case.id))
        try:
            check(case, status, stderr, out)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0][:400])
    print(f"{len(table())} cases, {len(failures)} failing; slowest:", sorted(durations)[-5:])
    Path(os.environ.get("BAD_INPUTS_LOG", os.devnull)).write_text("\n".join(failures) + "\n" + "\n".join(f"{d:.2f} {i}" for d, i in sorted(durations)))
    assert not failures, f"{len(failures)} of {len(table())} cases not refused cleanly:\n" + "\n".join(failures)


# --------------------------------------------------------------------------- real subprocesses
def test_bad_inputs_as_real_commands(resolved: dict[str, dict], tmp_path: Path) -> None:
    """Three rows as real ``python -m core.run`` / ``flowforge sample`` processes, run in parallel.

    These are the ones whose failure happened outside the config code path (reading the file, preparing
    the directory, picking the device); the in-process table covers everything else.
    """
    base = tmp_path / "base.toml"
    base.write_text(tomli_w.dumps(_without_none(resolved["rectified_flow_2d"])))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    fake_run = tmp_path / "fake_run"
    fake_run.mkdir()
    commands = {
        "not UTF-8": ([_non_utf8(tmp_path, _without_none(resolved["rectified_flow_2d"])), "--out", str(tmp_path / "o1")],
                      "UTF-8", tmp_path / "o1"),
        "--out below a regular file": ([str(base), "--out", str(blocker / "run")], "is a file", blocker / "run"),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    procs = {name: subprocess.Popen([sys.executable, "-m", "core.run", *argv], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _, _) in commands.items()}
    procs["sample --device cuda"] = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "sample", str(fake_run), "--device", "cuda"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commands["sample --device cuda"] = ([], "--device", fake_run)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        _, key, out = commands[name]
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err}"
        assert "Traceback" not in err and key in err, f"{name}:\n{err}"
        assert not out.exists() or not any(out.iterdir()), f"{name}: wrote into {out}"


def test_a_cuda_launcher_is_checked_when_launching_not_when_reading_a_run(monkeypatch) -> None:
    """launcher.device = "cuda" is refused by the launcher (before anything is written), while the
    same config still resolves, so a run trained on a GPU can be sampled on a machine without one."""
    import torch

    import registry
    from core import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    raw = _without_none(_resolved()["rectified_flow_2d"])
    raw["launcher"] = {"plugin": "local", "device": "cuda"}
    config.resolve(raw)
    for plugin in ("local", "accelerate"):
        with pytest.raises(registry.ConfigError, match="no CUDA device"):
            registry.build("launcher", {"plugin": plugin, "device": "cuda"})
