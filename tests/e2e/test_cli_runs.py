"""The researcher's loop on finished runs: ``flowforge sample``, ``eval`` and ``compare``, and TensorBoard logging.

Two tiny runs are trained once per module: experiments/rectified_flow_2d.toml
(30 steps) and a conditional rectified flow on the 8x8 digits (with a feature
Frechet distance whose feature network is cached in a temporary folder).
"""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import torch
import pytest

from core.cli import main as cli
from core.rundir import RunDir
from core.run import run

from ..conftest import RF2D, TINY_RF2D, run_cli

RF_SETTINGS = [*TINY_RF2D, "trainer.steps=30", "eval.num_samples=128", "eval.batch_size=128", "eval.untrained=false"]
DIGITS_SETTINGS = [
    *TINY_RF2D, "trainer.steps=30", "eval.untrained=false", "eval.num_samples=100", "eval.batch_size=100",
    "experiment.name='digits-rf'", "data={plugin='digits'}", "objective.label_dropout=0.2",
    "metrics=[{plugin='frechet_distance', train_steps=5, feature_dim=16}]",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The feature-network cache of this module (never the user's ~/.cache)."""
    path = tmp_path_factory.mktemp("feature-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLOWFORGE_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def rf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rf"
    run(RF2D, RF_SETTINGS, out=out)
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("runs") / "digits"
    run(RF2D, DIGITS_SETTINGS, out=out)
    return out


def finite_numbers(rows, columns):
    values = [float(r[c]) for r in rows for c in columns if r[c] != ""]
    assert values and all(math.isfinite(v) for v in values), rows
    return values


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- sample
def test_sample_writes_a_scatter_plot_and_npz(rf_run, tmp_path, capsys):
    stem = tmp_path / "pts"
    assert cli(["sample", str(rf_run), "--steps", "3", "--method", "euler", "-n", "50", "--seed", "1",
                "--out", str(stem), "--npz"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["nfe"] == 3 and info["weights"] == "ema" and info["solver"]["method"] == "euler"
    assert (tmp_path / "pts.png").stat().st_size > 1000
    x = np.load(tmp_path / "pts.npz")["x"]
    assert x.shape == (50, 2) and np.isfinite(x).all()
    # the same seed gives the same samples; raw weights give others
    assert cli(["sample", str(rf_run), "--set", "solver.steps=3", "--method", "euler", "-n", "50", "--seed", "1",
                "--out", str(tmp_path / "again"), "--npz"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["x"], x)
    assert cli(["sample", str(rf_run), "--steps", "3", "--method", "euler", "-n", "50", "--seed", "1", "--no-ema",
                "--out", str(tmp_path / "raw"), "--npz"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["weights"] == "raw"
    assert not np.array_equal(np.load(tmp_path / "raw.npz")["x"], x)


def test_sample_digits_grid_with_labels_and_guidance(digits_run, capsys):
    assert cli(["sample", str(digits_run), "-n", "20", "--labels", "3,7", "--guidance", "1.5", "--npz"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    png, npz = info["files"]
    assert png.startswith(str(digits_run / "samples")) and png.endswith(".png")
    data = np.load(npz)
    assert data["arr_0"].shape == (20, 8, 8, 1) and data["arr_0"].dtype == np.uint8  # as the ADM evaluator reads
    assert list(data["arr_1"][:4]) == [3, 7, 3, 7]
    assert info["guidance_scale"] == 1.5


def test_sample_streams_blocks_and_writes_uint8_images_like_guided_diffusion(digits_run, tmp_path, capsys):
    """Whole block k of -n N is block k of any other -n; arr_0 is uint8((x + 1) * 127.5) in NHWC; the PNG
    folder holds the same pixels; the picture shows only --grid samples."""
    from PIL import Image

    from core.commands.sample import to_uint8_nhwc

    small, big = tmp_path / "small", tmp_path / "big"
    assert cli(["sample", str(digits_run), "-n", "8", "--batch-size", "4", "--npz", "--out", str(small)]) == 0
    assert cli(["sample", str(digits_run), "-n", "30", "--batch-size", "4", "--npz", "--grid", "8",
                "--png-folder", str(tmp_path / "pngs"), "--out", str(big)]) == 0
    a, b = np.load(f"{small}.npz"), np.load(f"{big}.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"][:8])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"][:8])
    assert b["arr_0"].shape == (30, 8, 8, 1) and b["arr_1"].shape == (30,)
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(pngs) == 30 and pngs[0].name == "000000.png"
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[29])), b["arr_0"][29, ..., 0])
    x = torch.tensor([[[[-1.0, -0.999, 0.0, 1.0, 1.5]]]])
    assert to_uint8_nhwc(x).reshape(-1).tolist() == [0, 0, 127, 255, 255]
    assert Image.open(f"{big}.png").size[0] < Image.open(f"{small}.png").size[0] * 3  # 8 shown, not 30


# --------------------------------------------------------------------------- eval
def test_eval_sweeps_methods_and_steps(rf_run, tmp_path, capsys):
    out = tmp_path / "ev"
    assert cli(["eval", str(rf_run), "--method", "euler,midpoint", "--steps", "2,4", "-n", "64",
                "--out", str(out)]) == 0
    rows = read_csv(out / "eval.csv")
    assert len(rows) == 4
    assert [int(r["nfe"]) for r in rows] == [2, 4, 4, 8]
    finite_numbers(rows, ["energy_distance", "sliced_wasserstein"])
    assert (out / "eval.png").stat().st_size > 5000
    md = (out / "eval.md").read_text()
    assert "Data-vs-data floor" in md and md.count("\n| ode |") == 4
    data = json.loads((out / "eval.json").read_text())
    assert {"energy_distance", "sliced_wasserstein", "energy_distance_se", "sliced_wasserstein_se"} <= set(data["floor"])
    assert data["repeats"] == 3 and "standard error" in md and " ± " in md


def test_eval_error_bars_are_the_spread_of_independent_repeats(rf_run, tmp_path):
    """The `_se` column is s / sqrt(R) of R single-seed evaluations (seeds seed .. seed+R-1)."""
    import math
    import statistics

    single = []
    for seed in (5, 6, 7):
        out = tmp_path / f"one{seed}"
        assert cli(["eval", str(rf_run), "--steps", "4", "-n", "64", "--seed", str(seed), "--repeats", "1",
                    "--no-floor", "--out", str(out)]) == 0
        row = read_csv(out / "eval.csv")[0]
        assert "energy_distance_se" not in row
        single.append(float(row["energy_distance"]))
    out = tmp_path / "three"
    assert cli(["eval", str(rf_run), "--steps", "4", "-n", "64", "--seed", "5", "--repeats", "3", "--out", str(out)]) == 0
    row = read_csv(out / "eval.csv")[0]
    assert math.isclose(float(row["energy_distance"]), statistics.mean(single), rel_tol=1e-6)
    assert math.isclose(float(row["energy_distance_se"]), statistics.stdev(single) / math.sqrt(3), rel_tol=1e-6)
    floor = json.loads((out / "eval.json").read_text())["floor"]
    assert floor["energy_distance_se"] > 0
    assert cli(["eval", str(rf_run), "--repeats", "0"]) == 2


def test_eval_default_sweep_is_around_the_run_steps(rf_run):
    assert cli(["eval", str(rf_run), "-n", "32", "--no-floor"]) == 0
    rows = read_csv(rf_run / "eval" / "eval.csv")
    assert [int(r["steps"]) for r in rows] == [1, 2, 4, 8]  # the run samples with 4 steps


def test_eval_digits_feature_metrics_and_guidance(digits_run, cache, tmp_path):
    out = tmp_path / "ev"
    assert cli(["eval", str(digits_run), "--steps", "2", "--guidance", "0,2", "-n", "40", "--out", str(out),
                "--metric", "{plugin = 'frechet_distance', train_steps = 5, feature_dim = 16}",
                "--metric", "{plugin = 'precision_recall', train_steps = 5, feature_dim = 16}",
                "--metric", "energy_distance"]) == 0
    rows = read_csv(out / "eval.csv")
    assert [float(r["guidance"]) for r in rows] == [0.0, 2.0]
    finite_numbers(rows, ["frechet_distance", "precision_recall/precision", "precision_recall/recall",
                          "energy_distance"])
    assert (out / "eval.png").exists()
    # the run's metric and both --metric entries share one cached feature network
    assert len(list((cache / "features").glob("*.pt"))) == 1


# --------------------------------------------------------------------------- compare
def test_compare_has_one_row_per_run_and_only_differing_keys(rf_run, digits_run, tmp_path):
    out = tmp_path / "cmp"
    assert cli(["compare", str(rf_run), str(digits_run), "--out", str(out)]) == 0
    rows = read_csv(out / "compare.csv")
    assert [r["run"] for r in rows] == [str(rf_run), str(digits_run)]
    assert "data.plugin" in rows[0] and "experiment.name" in rows[0]
    assert "trainer.steps" not in rows[0]  # equal in both runs
    assert rows[0]["energy_distance"] and rows[1]["frechet_distance"]
    finite_numbers(rows, ["final_loss"])
    assert (out / "compare.png").stat().st_size > 5000
    assert (out / "compare.md").read_text().count(f"| {rf_run} |") == 1


def test_compare_shows_loss_by_time_bin():
    from core.commands.compare import loss_bins

    records = [{"step": s, "loss": 1.0, "loss_bin/0.25": 2.0 + s, "loss_bin/0.0": 1.0, "loss_bin/1.0": 3.0}
               for s in range(4)]
    bins = loss_bins(records)
    assert [k for k, _ in bins] == ["loss_bin/0.0", "loss_bin/0.25", "loss_bin/1.0"]
    assert bins[1][1] == 5.0  # the mean over the last quarter of the records


# --------------------------------------------------------------------------- errors
def test_missing_checkpoint_exits_2_with_a_clear_message(rf_run, tmp_path):
    broken = tmp_path / "no-ckpt"
    shutil.copytree(rf_run, broken, ignore=shutil.ignore_patterns("*.pt"))
    result = run_cli(["-m", "core.cli", "sample", str(broken)])
    assert result.returncode == 2, result.stderr
    assert "no checkpoint in" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_checkpoint_and_non_run_directories_exit_2(rf_run, tmp_path, capsys):
    broken = tmp_path / "corrupt"
    shutil.copytree(rf_run, broken)
    for ckpt in (broken / "checkpoints").glob("*.pt"):
        ckpt.write_bytes(b"\x00garbage")
    assert cli(["eval", str(broken)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert cli(["sample", str(tmp_path)]) == 2
    assert "not a flowforge run directory" in capsys.readouterr().err
    assert cli(["compare", str(rf_run), str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli(["sample", str(rf_run), "--set", "backbone.hidden=48"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert cli(["eval", str(rf_run), "--sweep", "nosuchoption=1,2"]) == 2
    assert "solver" in capsys.readouterr().err


# --------------------------------------------------------------------------- TensorBoard
# TensorBoard is a logger plugin now ([[loggers]] plugin = "tensorboard"): tests/registry/test_extension_points.py
def test_without_a_logger_only_jsonl_is_written(tmp_path):
    rd = RunDir(tmp_path)
    rd.log({"step": 1, "loss": 1.0})
    assert rd.read_metrics() == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists()


def test_differing_keys_skip_options_of_different_plugins():
    from core.commands.compare import differing_keys
    from core.runs import flatten

    a = flatten({"solver": {"plugin": "ode", "steps": 8, "method": "euler"}, "trainer": {"lr": 1e-3},
                 "metrics": [{"plugin": "kid"}]})
    b = flatten({"solver": {"plugin": "ddim", "respacing": "8"}, "trainer": {"lr": 1e-3},
                 "metrics": [{"plugin": "kid"}]})
    c = flatten({"solver": {"plugin": "ode", "steps": 16, "method": "euler"}, "trainer": {"lr": 2e-3},
                 "metrics": [{"plugin": "kid"}]})
    assert differing_keys([a, b]) == ["solver.plugin"]
    assert differing_keys([a, c]) == ["solver.steps", "trainer.lr"]
    assert differing_keys([a, b, c]) == ["solver.plugin", "trainer.lr"]
    assert a["metrics[0].plugin"] == "kid"
