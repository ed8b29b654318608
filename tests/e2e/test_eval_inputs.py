"""``flowforge eval --input1 A --input2 B``: external PNG folders and ADM-layout npz archives scored like
``fidelity --input1 --input2`` / pytorch-fid.

Each value is checked against FID computed here in float64 with scipy's sqrtm, and KID with an
unbiased-MMD written here, from the same features; a ``flowforge sample`` npz round-trips (FID 0 against
its own PNG folder, and against the run's reference data equal to the float64 value from the held-out
examples drawn here); bad paths exit 2; two torchrun processes give the numbers of one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import registry
from core.cli import main as cli
from core.interfaces import DataSpec

from ..conftest import ROOT
from ..plugins.metrics.test_feature_extractors import random_inception, scipy_fid


def write_pngs(folder, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:04d}.png")


def pixel_features(images: np.ndarray) -> np.ndarray:
    """The pixels extractor's features of uint8 (N, H, W, C) images, written independently: CHW floats in [-1, 1]."""
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
    return x.reshape(len(x), -1).astype(np.float64)


def kid_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al.), whole sets."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    m, n = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * kab.mean())


def score(capsys, *args: str) -> dict:
    capsys.readouterr()
    status = cli(["eval", *args])
    out = capsys.readouterr().out
    assert status == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (60, 3, 3, 3), dtype=np.uint8)  # 27 features, 60 and 56 examples: full-rank covariances
    b = np.clip(rng.normal(150, 40, (56, 3, 3, 3)), 0, 255).astype(np.uint8)
    write_pngs(tmp_path / "a", a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    return a, b


def test_folder_against_npz_equals_float64_fid_and_kid(images, tmp_path, capsys):
    a, b = images
    got = score(capsys, "--input1", str(tmp_path / "a"), "--input2", str(tmp_path / "b.npz"), "--features", "pixels",
                "--metric", "frechet_distance", "--metric", "{plugin = 'kid', subset_size = 100}",
                "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    fa, fb = pixel_features(a), pixel_features(b)
    assert got["n1"] == 60 and got["n2"] == 56
    assert got["metrics"]["frechet_distance"] == pytest.approx(scipy_fid(fa, fb), rel=1e-8)
    assert got["metrics"]["kid"] == pytest.approx(kid_unbiased(fa, fb), rel=1e-8)
    assert json.loads((tmp_path / "out" / "eval-inputs.json").read_text()) == got
    # the second evaluation reads the reference statistics from the cache, with the same numbers
    again = score(capsys, "--input1", str(tmp_path / "a"), "--input2", str(tmp_path / "b.npz"), "--features", "pixels",
                  "--metric", "frechet_distance", "--metric", "{plugin = 'kid', subset_size = 100}",
                  "--cache", str(tmp_path / "cache"))
    assert again["metrics"] == got["metrics"]
    assert got["reference_from_cache"] == {"frechet_distance": False, "kid": False}
    assert again["reference_from_cache"] == {"frechet_distance": True, "kid": True}


def test_inception_features_from_a_local_file(tmp_path, capsys):
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    table = {"plugin": "inception", "weights": str(random_inception(tmp_path / "w.pth")), "resize": 75}
    got = score(capsys, "--input1", str(tmp_path / "a.npz"), "--input2", str(tmp_path / "b.npz"), "--no-cache",
                "--features", "{plugin = 'inception', weights = '%s', resize = 75}" % table["weights"],
                "--metric", "kid")
    ext = registry.build("feature_extractor", table, spec=DataSpec(shape=(3, 16, 16)))
    to = lambda u: torch.from_numpy(u).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    fa, fb = ext(to(a)).numpy(), ext(to(b)).numpy()
    assert fa.shape == (5, 2048)  # fewer examples than features: KID, not FID, is well defined here
    assert got["metrics"]["kid"] == pytest.approx(kid_unbiased(fa, fb), rel=1e-6)


@pytest.mark.parametrize("case", ["missing", "empty folder", "text file", "float npz", "shapes differ", "alone",
                                  "no metric", "not a feature metric", "no weights"])
def test_bad_inputs_exit_2(images, tmp_path, capsys, case, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((3, 6, 6, 3), dtype=np.float32))
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((3, 7, 7, 3), dtype=np.uint8))  # the others are 3 x 3
    first = {"missing": "nope", "empty folder": "empty", "text file": "notes.txt", "float npz": "float.npz",
             "shapes differ": "big.npz"}.get(case, "a")
    args = ["eval", "--input1", str(tmp_path / first), "--features", "inception" if case == "no weights" else "pixels"]
    if case != "alone":
        args += ["--input2", str(tmp_path / "b.npz")]
    if case != "no metric":
        args += ["--metric", "energy_distance" if case == "not a feature metric" else "frechet_distance"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    expected = {"no metric": "need --metric", "not a feature metric": "not a feature metric",
                "no weights": "--features.weights: the inception extractor needs InceptionV3 weights"}
    assert expected.get(case, "--input") in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # the digits' corner pixels never vary
def test_a_sample_npz_round_trips(tmp_path, capsys):
    from core.data import derive_seed
    from core.run import run
    from core.runs import load_experiment

    from .test_eval_invariance import FAST

    out = tmp_path / "run"
    run(ROOT / "experiments" / "rf_digits.toml", [*FAST, "trainer.steps=2", "metrics=[{plugin='energy_distance'}]",
                                                  "eval.num_samples=16"], out=out)
    assert cli(["sample", str(out), "-n", "48", "--steps", "2", "--npz", "--png-folder", str(tmp_path / "pngs"),
                "--out", str(tmp_path / "s")]) == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (48, 8, 8, 1)
    common = ["--features", "pixels", "--metric", "frechet_distance", "--cache", str(tmp_path / "cache")]
    same = score(capsys, "--input1", str(tmp_path / "s.npz"), "--input2", str(tmp_path / "pngs"), *common)
    assert abs(same["metrics"]["frechet_distance"]) < 1e-9  # the PNG folder holds exactly the npz's images
    got = score(capsys, "--input1", str(tmp_path / "s.npz"), "--input2", str(out), "--seed", "5", *common)
    exp = load_experiment(out)
    data = registry.build("data", exp.components["data"])
    held_out = data.reference(48, torch.Generator().manual_seed(derive_seed(5, "eval-reference")))["x"]
    ref = ((held_out.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    expected = scipy_fid(pixel_features(arr), pixel_features(ref))
    assert got["n2"] == 48 and got["metrics"]["frechet_distance"] == pytest.approx(expected, rel=1e-8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_processes_give_the_numbers_of_one(images, tmp_path, capsys):
    args = ["--input1", str(tmp_path / "a"), "--input2", str(tmp_path / "b.npz"), "--features", "pixels", "--no-cache",
            "--batch-size", "7", "--metric", "frechet_distance", "--metric", "{plugin = 'kid', subset_size = 100}"]
    one = score(capsys, *args)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "core.cli", "eval", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    two = json.loads(lines[0])
    for key, value in one["metrics"].items():
        assert abs(value - two["metrics"][key]) <= 1e-9 * max(1.0, abs(value)), (key, value, two["metrics"][key])
