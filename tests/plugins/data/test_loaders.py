"""The file-backed data loaders: cifar10 (pickle batches), imagefolder (class folders), npz (arrays).

Every test writes its own tiny files in the loader's format with the test kit's
writers (`core.testing.files`: `write_cifar10`, `write_imagefolder`, `write_npz`).
"""

from __future__ import annotations

import itertools
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import registry
from core.data import step_indices
from core.testing.data import check_data_source
from core.testing.files import CIFAR_NAMES, cifar_pickle, write_cifar10, write_imagefolder, write_npz
from registry import ConfigError


def build(**mapping):
    return registry.build("data", mapping)


def first(data, batch_size, **kw):
    return next(iter(data.train_batches(batch_size, **kw)))


# --------------------------------------------------------------------------- cifar10
def test_cifar10_reads_official_format(tmp_path):
    folder = write_cifar10(tmp_path)
    data = build(plugin="cifar10", root=str(folder), conditional=True, flip=False)
    assert data.spec.shape == (3, 32, 32) and data.spec.kind == "continuous" and data.spec.num_classes == 10
    assert data.spec.extra["class_names"] == CIFAR_NAMES
    assert data.num_examples == 60
    b = first(data, 8, seed=0)
    assert b["x"].shape == (8, 3, 32, 32) and b["x"].dtype == torch.float32
    assert -1.0 <= float(b["x"].min()) and float(b["x"].max()) <= 1.0
    assert b["y"].dtype == torch.int64 and b["y"].shape == (8,)
    # Pixel order: each row is the R, G, B planes of 32x32, row-major; labels follow their images.
    raw = [pickle.loads((folder / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    rows = np.concatenate([r[b"data"] for r in raw])
    labels = np.concatenate([r[b"labels"] for r in raw])
    idx = step_indices(60, 8, 0, 0).numpy()
    expect = torch.from_numpy(rows[idx].reshape(8, 3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(b["x"], expect)
    assert b["y"].tolist() == labels[idx].tolist()
    assert b["x"][0, 1, 0, 1] == float(rows[idx[0], 1024 + 1]) / 127.5 - 1  # green plane, row 0, column 1


def test_cifar10_discrete_and_unconditional(tmp_path):
    folder = write_cifar10(tmp_path)
    data = build(plugin="cifar10", root=str(tmp_path), form="discrete")  # the parent folder works too
    assert data.spec.kind == "discrete" and data.spec.vocab_size == 256 and data.spec.num_classes == 0
    b = first(data, 6, seed=3)
    assert set(b) == {"x"} and b["x"].dtype == torch.int64 and 0 <= int(b["x"].min()) and int(b["x"].max()) <= 255
    cont = build(plugin="cifar10", root=str(folder))
    assert torch.equal(first(cont, 6, seed=3)["x"], b["x"].float() / 127.5 - 1)  # same images, same flips
    assert data.render(b, str(tmp_path / "grid"))[0].endswith("grid.png")


@pytest.mark.parametrize("form", ["continuous", "discrete"])
def test_cifar10_conformance(tmp_path, form):
    folder = write_cifar10(tmp_path)
    data = build(plugin="cifar10", root=str(folder), form=form, conditional=True)
    check_data_source(data, name="cifar10", batch_size=4, world_size=2, exact_partition=True)


def test_cifar10_flip_is_seeded_and_partitions(tmp_path):
    folder = write_cifar10(tmp_path)
    flip = build(plugin="cifar10", root=str(folder), flip=True)
    plain = build(plugin="cifar10", root=str(folder), flip=False)
    flipped_any = False
    for step in range(3):
        a, p = first(flip, 16, seed=1, start_step=step), first(plain, 16, seed=1, start_step=step)
        same = (a["x"] == p["x"]).flatten(1).all(1)
        mirrored = (a["x"] == p["x"].flip(-1)).flatten(1).all(1)
        assert bool((same | mirrored).all())
        flipped_any |= bool((mirrored & ~same).any())
        assert torch.equal(a["x"], first(flip, 16, seed=1, start_step=step)["x"])
        halves = [first(flip, 8, seed=1, start_step=step, rank=r, world_size=2)["x"] for r in range(2)]
        assert torch.equal(torch.cat(halves), a["x"])  # ranks take contiguous slices of the global batch
    assert flipped_any


def test_cifar10_reference_splits_and_tarball(tmp_path):
    folder = write_cifar10(tmp_path / "x")
    test = pickle.loads((folder / "test_batch").read_bytes())[b"data"].reshape(-1, 3, 32, 32)
    data = build(plugin="cifar10", root=str(folder), max_train=25)
    assert data.num_examples == 25
    ref = data.reference(12, torch.Generator().manual_seed(0))["x"]
    as_u8 = ((ref + 1) * 127.5).round().to(torch.uint8).numpy()
    assert {r.tobytes() for r in as_u8} == {r.tobytes() for r in test}  # all 12 test images
    train_ref = build(plugin="cifar10", root=str(folder), reference="train", max_train=25)
    assert len(train_ref.held_out) == 25
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_tar = build(plugin="cifar10", root=str(tar_path), conditional=True)
    from_dir = build(plugin="cifar10", root=str(folder), conditional=True)
    a, b = first(from_tar, 10, seed=2, start_step=4), first(from_dir, 10, seed=2, start_step=4)
    assert all(torch.equal(a[k], b[k]) for k in ("x", "y"))


def test_cifar10_accepts_numpy2_global_name_and_workers(tmp_path):
    folder = write_cifar10(tmp_path)
    raw = pickle.loads((folder / "data_batch_1").read_bytes())
    (folder / "data_batch_1").write_bytes(pickle.dumps(raw, protocol=3))  # numpy._core.multiarray under NumPy 2
    base = build(plugin="cifar10", root=str(folder))
    threaded = build(plugin="cifar10", root=str(folder), num_workers=2)
    for a, b in zip(itertools.islice(base.train_batches(8, seed=0, start_step=5), 6),
                    itertools.islice(threaded.train_batches(8, seed=0, start_step=5), 6)):
        assert torch.equal(a["x"], b["x"])


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _layout_error(tmp_path, match: str, **options) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        build(plugin="cifar10", **{"root": str(tmp_path / "cifar-10-batches-py"), **options})
    return str(info.value)


def test_cifar10_rejects_malformed(tmp_path):
    msg = _layout_error(tmp_path, "no such path")
    assert "data_batch_1" in msg and "test_batch" in msg and "b'data'" in msg  # names the layout
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    assert "lacks test_batch" in _layout_error(tmp_path, "lacks")
    write_cifar10(tmp_path)
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    assert "data_batch_2 is not a readable CIFAR-10 pickle" in _layout_error(tmp_path, "not a readable")
    (folder / "data_batch_2").write_bytes(b"this is not a pickle at all")
    _layout_error(tmp_path, "data_batch_2")
    (folder / "data_batch_2").write_bytes(cifar_pickle({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}))
    _layout_error(tmp_path, r"uint8 \(4, 1024\); expected uint8 \(N, 3072\)")
    (folder / "data_batch_2").write_bytes(cifar_pickle({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 11]}))
    _layout_error(tmp_path, "outside 0..9")
    (folder / "data_batch_2").write_bytes(cifar_pickle({b"pixels": np.zeros((4, 3072), np.uint8)}))
    _layout_error(tmp_path, "lacks b'data'")
    (folder / "data_batch_2").write_bytes(cifar_pickle([1, 2, 3]))
    _layout_error(tmp_path, "holds a list, not a dict")
    marker = tmp_path / "pwned"
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=3))
    msg = _layout_error(tmp_path, "refused global")
    assert "system" in msg and not marker.exists()
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros(3), b"x": torch.nn.Identity}, protocol=3))
    _layout_error(tmp_path, "refused global torch")
    not_tar = tmp_path / "cifar.tar.gz"
    not_tar.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable tar archive"):
        build(plugin="cifar10", root=str(not_tar))


def test_cifar10_error_names_the_experiment_key(tmp_path):
    from core.config import resolve
    from core.trainer import build_components

    exp = resolve({"data": {"plugin": "cifar10", "root": str(tmp_path / "nowhere")},
                   "backbone": {"plugin": "mlp"}, "objective": {"plugin": "velocity_mse"}}, file="exp.toml")
    with pytest.raises(ConfigError) as info:
        build_components(exp)
    assert str(info.value).startswith("exp.toml: data.root: no such path")


# --------------------------------------------------------------------------- imagefolder
def test_imagefolder_reads_tree(tmp_path):
    root = write_imagefolder(tmp_path / "tree")
    data = build(plugin="imagefolder", root=str(root), resolution=16, num_workers=0, held_out_fraction=0.34)
    assert data.spec.shape == (3, 16, 16) and data.spec.num_classes == 3
    assert data.spec.extra["class_names"] == ["cat", "dog", "emu"]
    assert data.num_examples == 12 and len(data.held_out) == 6  # 2 of 6 per class held out
    assert not set(data.train.files) & set(data.held_out.files)
    b = first(data, 5, seed=0)
    assert b["x"].shape == (5, 3, 16, 16) and b["x"].dtype == torch.float32
    assert -1.0 <= float(b["x"].min()) <= float(b["x"].max()) <= 1.0
    for label, path in zip(b["y"].tolist(), [data.train.files[i] for i in step_indices(12, 5, 0, 0).tolist()]):
        assert Path(path).parent.name == data.spec.extra["class_names"][label]
    grey = build(plugin="imagefolder", root=str(root), resolution=8, channels=1, form="discrete", num_workers=0,
                 conditional=False)
    g = first(grey, 4, seed=0)
    assert set(g) == {"x"} and g["x"].shape == (4, 1, 8, 8) and g["x"].dtype == torch.int64
    assert grey.render(g, str(tmp_path / "grid"))[0].endswith(".png")


def test_imagefolder_center_crop_matches_guided_diffusion():
    from PIL import Image

    from plugins.data.imagefolder import center_crop_arr

    arr = np.zeros((40, 100, 3), np.uint8)
    arr[:, 30:70] = 255  # a white band in the middle 40 columns
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    assert out[:, 2:14].min() > 200  # the crop keeps the centre band


def test_imagefolder_conformance_and_workers(tmp_path):
    root = write_imagefolder(tmp_path / "tree")
    data = build(plugin="imagefolder", root=str(root), resolution=8, num_workers=0)
    check_data_source(data, name="imagefolder", batch_size=4, world_size=2, exact_partition=True)
    workers = build(plugin="imagefolder", root=str(root), resolution=8, num_workers=2, prefetch_factor=2)
    for a, b in zip(itertools.islice(data.train_batches(4, seed=5, start_step=2, rank=1, world_size=2), 4),
                    itertools.islice(workers.train_batches(4, seed=5, start_step=2, rank=1, world_size=2), 4)):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    ref = workers.reference(7, torch.Generator().manual_seed(0))
    assert torch.equal(ref["x"], data.reference(7, torch.Generator().manual_seed(0))["x"])


def test_imagefolder_flip_and_held_out_tree(tmp_path):
    root = write_imagefolder(tmp_path / "train")
    val = write_imagefolder(tmp_path / "val", classes=("dog",), per_class=3, seed=1)
    flip = build(plugin="imagefolder", root=str(root), resolution=8, num_workers=0, held_out=str(val))
    plain = build(plugin="imagefolder", root=str(root), resolution=8, num_workers=0, held_out=str(val), flip=False)
    assert flip.num_examples == 18 and len(flip.held_out) == 3
    ref = flip.reference(3, torch.Generator().manual_seed(0))
    assert ref["y"].tolist() == [1, 1, 1]  # labelled by the training classes' order
    a, p = first(flip, 18, seed=0), first(plain, 18, seed=0)
    mirrored = (a["x"] == p["x"].flip(-1)).flatten(1).all(1)
    same = (a["x"] == p["x"]).flatten(1).all(1)
    assert bool((same | mirrored).all()) and bool((mirrored & ~same).any())


def test_imagefolder_rejects_malformed(tmp_path):
    with pytest.raises(ConfigError, match="no folder .*CLASS_NAME/IMAGE.png"):
        build(plugin="imagefolder", root=str(tmp_path / "missing"))
    loose = tmp_path / "loose"
    loose.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(loose / "a.png")
    with pytest.raises(ConfigError, match="no class folders .*1 images directly"):
        build(plugin="imagefolder", root=str(loose))
    root = write_imagefolder(tmp_path / "tree")
    (root / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        build(plugin="imagefolder", root=str(root))
    (root / "empty").rmdir()
    other = write_imagefolder(tmp_path / "other", classes=("yak",), per_class=1)
    with pytest.raises(ConfigError, match="'yak' .* not among the training classes"):
        build(plugin="imagefolder", root=str(root), held_out=str(other))
    with pytest.raises(ConfigError, match="channels"):
        build(plugin="imagefolder", root=str(root), channels=2)
    (root / "cat" / "im0.png").write_bytes(b"not a png")
    data = build(plugin="imagefolder", root=str(root), resolution=8, num_workers=0, held_out_fraction=0.0)
    with pytest.raises(ConfigError, match="cannot decode image .*im0.png"):
        data.reference(18, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- npz
def test_npz_reads_latents_memory_mapped(tmp_path):
    path = write_npz(tmp_path / "latents.npz")
    data = build(plugin="npz", path=str(path), scale=0.5, held_out_fraction=0.25)
    assert isinstance(data.train.x, np.memmap)
    assert data.spec.shape == (4, 8, 8) and data.spec.kind == "continuous" and data.spec.num_classes == 5
    assert data.num_examples == 30 and len(data.held_out) == 10
    assert np.bincount(data.held_out.y[data.held_out.index], minlength=5).tolist() == [2] * 5  # stratified
    assert not set(data.train.index) & set(data.held_out.index)
    in_memory = build(plugin="npz", path=str(path), scale=0.5, held_out_fraction=0.25, mmap=False)
    assert not isinstance(in_memory.train.x, np.memmap)
    b, c = first(data, 6, seed=1, start_step=3), first(in_memory, 6, seed=1, start_step=3)
    assert torch.equal(b["x"], c["x"]) and torch.equal(b["y"], c["y"])
    raw = np.load(path)
    rows = data.train.index[step_indices(30, 6, 3, 1).numpy()]
    assert torch.equal(b["x"], torch.from_numpy(raw["x"][rows]) * 0.5)
    assert b["y"].tolist() == raw["y"][rows].tolist()
    check_data_source(data, name="npz", batch_size=4, world_size=2, exact_partition=True)


def test_npz_variants(tmp_path):
    comp = write_npz(tmp_path / "c.npz", compressed=True, labels=np.arange(40) % 3)
    data = build(plugin="npz", path=str(comp), y_key="labels", held_out_fraction=0.0, flip=True)
    assert not isinstance(data.train.x, np.memmap) and data.spec.num_classes == 3
    assert data.held_out is data.train  # fraction 0: reference draws training rows
    check_data_source(data, name="npz", batch_size=4, world_size=2, exact_partition=True)
    held = write_npz(tmp_path / "val.npz", n=10, seed=3)
    data = build(plugin="npz", path=str(write_npz(tmp_path / "t.npz")), held_out=str(held), num_classes=1000)
    assert data.num_examples == 40 and len(data.held_out) == 10 and data.spec.num_classes == 1000
    tokens = write_npz(tmp_path / "tok.npz", shape=(3, 4, 4), dtype=np.uint8)
    disc = build(plugin="npz", path=str(tokens), y_key="")
    assert disc.spec.kind == "discrete" and disc.spec.vocab_size == 7 and disc.spec.num_classes == 0
    b = first(disc, 4, seed=0)
    assert set(b) == {"x"} and b["x"].dtype == torch.int64
    images = build(plugin="npz", path=str(tokens), form="continuous", scale=1 / 127.5, shift=-1.0)
    assert images.value_range == (-1.0, 1.0) and first(images, 4, seed=0)["x"].dtype == torch.float32
    assert images.render(first(images, 4, seed=0), str(tmp_path / "img"))
    assert data.render(first(data, 4, seed=0), str(tmp_path / "latents"))  # 4 channels: the first three
    threaded = build(plugin="npz", path=str(comp), y_key="labels", num_workers=3)
    plain = build(plugin="npz", path=str(comp), y_key="labels")
    for a, b in zip(itertools.islice(threaded.train_batches(5, seed=0), 7), itertools.islice(plain.train_batches(5, seed=0), 7)):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_npz_rejects_malformed(tmp_path):
    with pytest.raises(ConfigError, match=r"no file .*missing.npz.*np.savez\(path, x=..., y=...\)"):
        build(plugin="npz", path=str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="is not a .npz archive"):
        build(plugin="npz", path=str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "other.npz", latents=np.zeros((3, 2, 2)))
    with pytest.raises(ConfigError, match="has no array 'x' .*it holds: latents"):
        build(plugin="npz", path=str(tmp_path / "other.npz"))
    with pytest.raises(ConfigError, match="has no array 'label'"):
        build(plugin="npz", path=str(tmp_path / "other.npz"), x_key="latents", y_key="label")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ConfigError, match="without unpickling"):
        build(plugin="npz", path=str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "len.npz", x=np.zeros((4, 2, 2), np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(ConfigError, match=r"expected \(4,\) integer class labels"):
        build(plugin="npz", path=str(tmp_path / "len.npz"))
    np.savez(tmp_path / "flat.npz", x=np.zeros(5, np.float32))
    with pytest.raises(ConfigError, match=r"has shape \(5,\)"):
        build(plugin="npz", path=str(tmp_path / "flat.npz"))
    good = write_npz(tmp_path / "good.npz")
    other = write_npz(tmp_path / "val.npz", shape=(4, 4, 4))
    with pytest.raises(ConfigError, match="examples of .*val.npz"):
        build(plugin="npz", path=str(good), held_out=str(other))
    with pytest.raises(ConfigError, match="held_out_fraction"):
        build(plugin="npz", path=str(good), held_out_fraction=1.5)
    with pytest.raises(ConfigError, match="discrete"):
        build(plugin="npz", path=str(good), form="discrete")
    blob = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError, match="cut.npz"):
        build(plugin="npz", path=str(tmp_path / "cut.npz"))
