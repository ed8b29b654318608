"""Data faults are clear errors naming the file: decompression bombs, corrupt images in workers, truncated .npz."""

from __future__ import annotations

from pathlib import Path

import pytest

import registry
from core.data import generator
from core.testing.files import write_imagefolder, write_npz
from registry import ConfigError


def _imagefolder(root: Path, workers: int):
    return registry.build("data", {"plugin": "imagefolder", "root": str(root), "resolution": 8, "num_workers": workers,
                                   "held_out_fraction": 0.5})


def test_a_decompression_bomb_is_refused_by_pillows_limit(tmp_path, monkeypatch):
    from PIL import Image

    root = write_imagefolder(tmp_path / "images", per_class=2, sizes=(40, 41))
    data = _imagefolder(root, workers=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # every 40x40 image is now "too large" (1600 px)
    with pytest.raises(ConfigError) as err:
        data.reference(4, generator(0))
    text = str(err.value)
    assert "Pillow's limit of 1000 pixels" in text and str(root) in text and "decompression bomb" in text


def test_a_corrupt_image_in_a_worker_names_the_file_without_the_worker_traceback(tmp_path):
    root = write_imagefolder(tmp_path / "images", per_class=2)
    for image in [*root.rglob("*.png"), *root.rglob("*.jpg")]:
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    data = _imagefolder(root, workers=1)
    with pytest.raises(ConfigError) as err:
        next(data.train_batches(6, seed=0))
    text = str(err.value)
    assert "cannot decode image" in text and str(root) in text
    assert "Traceback" not in text and "worker" not in text and len(text.splitlines()) == 1


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_a_truncated_npz_is_reported_as_truncated(tmp_path, compressed, keep):
    path = write_npz(tmp_path / "train.npz", compressed=compressed)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ConfigError) as err:
        registry.build("data", {"plugin": "npz", "path": str(path)})
    assert "truncated" in str(err.value) and str(path) in str(err.value)
    assert err.value.path == ("path",)


def test_a_bad_image_through_the_runner_exits_2_without_traceback(tmp_path, capsys):
    from core import run

    root = write_imagefolder(tmp_path / "images", per_class=2)
    for image in [*root.rglob("*.png"), *root.rglob("*.jpg")]:
        image.write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 5)
    file = tmp_path / "x.toml"
    file.write_text(f'[data]\nplugin = "imagefolder"\nroot = "{root}"\nresolution = 8\nnum_workers = 1\nheld_out_fraction = 0.5\n'
                    '[backbone]\nplugin = "mlp"\nhidden = 8\ndepth = 1\n[scheduler]\nplugin = "cond_ot"\n'
                    '[path]\nplugin = "affine"\n[objective]\nplugin = "velocity_mse"\n'
                    '[trainer]\nsteps = 2\nbatch_size = 6\nprogress = "off"\n[launcher]\nplugin = "local"\ndevice = "cpu"\n')
    status = run.main([str(file), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "cannot decode image" in err and "Traceback" not in err, err
