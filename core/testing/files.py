"""Small data sets in the standard on-disk formats, for tests and benchmarks (nothing is downloaded).

* `write_cifar10`: the CIFAR-10 "python version" folder (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``: pickled dicts with ``data (N, 3072) uint8`` rows of R, G, B planes).
* `write_imagefolder`: one folder per class of PNG and JPEG files.
* `write_npz`: an ``.npz`` of arrays ``x`` and ``y``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- writers
def cifar_pickle(obj: dict) -> bytes:
    """`obj` pickled the way the official files are: protocol 2-era opcodes naming ``numpy.core.multiarray``."""
    data = pickle.dumps(obj, protocol=3)  # protocol 3: bytes need no _codecs global
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar10(root: Path, per_batch: int = 12, seed: int = 0) -> Path:
    """A CIFAR-10-format folder ``root/cifar-10-batches-py`` with `per_batch` images per batch; returns it."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{k}.png".encode() for k in range(per_batch)]}
        (folder / name).write_bytes(cifar_pickle(batch))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(cifar_pickle(meta))
    return folder


def write_imagefolder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6, seed: int = 0,
                      sizes: tuple[int, int] = (12, 40)) -> Path:
    """A class-per-folder tree of PNG and JPEG images, heights and widths drawn from ``[sizes[0], sizes[1])``
    (by default assorted non-square shapes), and one non-image file; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            h, w = int(rng.integers(*sizes)), int(rng.integers(*sizes))
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            ext = ".png" if k % 2 == 0 else ".jpg"
            Image.fromarray(arr).save(root / name / f"im{k}{ext}")
    (root / classes[0] / "notes.txt").write_text("not an image")
    return root


def write_npz(path: Path, n: int = 40, shape=(4, 8, 8), classes: int = 5, dtype=np.float32, seed: int = 0,
              compressed: bool = False, **extra) -> Path:
    """An .npz with ``x (n, *shape)`` and ``y (n,)`` labels (balanced); returns its path."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(dtype) if np.dtype(dtype).kind == "f" else \
        rng.integers(0, 7, size=(n, *shape)).astype(dtype)
    arrays = {"x": x, "y": np.arange(n, dtype=np.int64) % classes, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path
