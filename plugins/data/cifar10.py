"""CIFAR-10 from its official python pickle batches, read without executing code.

Expected layout (``root``) — the "CIFAR-10 python version" of
https://www.cs.toronto.edu/~kriz/cifar.html, either extracted or as the archive::

    cifar-10-batches-py/          (root may name this folder, its parent,
        data_batch_1 .. data_batch_5   or cifar-10-python.tar.gz itself)
        test_batch
        batches.meta              (optional: class names)

Each batch is a pickled dict with ``b"data"``: a uint8 array ``(10000, 3072)``
whose rows are the red, green and blue 32x32 planes in row-major order, and
``b"labels"``: 10000 ints in 0..9.

Safety: the pickles are read by an ``Unpickler`` whose ``find_class`` allows
exactly the globals NumPy arrays are pickled with —
``numpy.core.multiarray._reconstruct`` (also under its NumPy 2 name
``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and
``numpy.dtype`` — and refuses every other global, so a tampered file cannot
run code. Dicts, lists, bytes and ints need no globals.

Forms: continuous ``x (B, 3, 32, 32)`` float32 in [-1, 1] (``v / 127.5 - 1``),
or discrete ``x (B, 3, 32, 32)`` int64 pixel levels 0..255 (vocabulary 256).
Labels ``y (B,)`` with ``conditional = true``. ``flip`` mirrors a per-step
seeded half of every training batch (see `plugins.data.npz.flip_mask`).
Held-out examples are the 10000 of ``test_batch``; ``reference = "train"``
draws them from the training images instead, the protocol of the published
CIFAR-10 FIDs (computed against the 50000 training images).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import Tensor

from core.interfaces import DataSpec
from registry import ConfigError

from .npz import ArraySource, Split

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LAYOUT = (f"the CIFAR-10 python version: a folder {FOLDER}/ holding {', '.join(TRAIN_FILES[:1])} .. {TRAIN_FILES[-1]}, "
          f"{TEST_FILE} and {META_FILE} (or cifar-10-python.tar.gz), each a pickled dict with b'data' "
          f"(10000, 3072) uint8 and b'labels' (10000 ints in 0..9)")

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct

#: The only globals a CIFAR-10 pickle may name.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside `ALLOWED_GLOBALS`."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only `ALLOWED_GLOBALS` (NumPy array reconstruction) and refuses all others."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refused global {module}.{name}: CIFAR-10 batches hold only dicts, lists, "
                                         f"bytes, ints and NumPy arrays") from None


def load_pickle(data: bytes, name: str) -> dict[str, Any]:
    """Unpickle one CIFAR-10 file's bytes safely into a dict with str keys (ConfigError when malformed)."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedGlobal as exc:
        raise ConfigError(f"{name}: {exc}", ("root",)) from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of a corrupt file
        raise ConfigError(f"{name} is not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc}); expected {LAYOUT}",
                          ("root",)) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{name} holds a {type(obj).__name__}, not a dict; expected {LAYOUT}", ("root",))
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def read_files(root: Path, names: list[str]) -> dict[str, bytes]:
    """The raw bytes of `names` (missing ones omitted) from the extracted folder or the .tar.gz at `root`."""
    if not root.exists():
        raise ConfigError(f"no such path {str(root)!r}: expected {LAYOUT}", ("root",))
    if root.is_file():
        try:
            with tarfile.open(root, "r:*") as tar:
                found = {}
                for member in tar:
                    base = Path(member.name).name
                    if member.isfile() and base in names and Path(member.name).parent.name == FOLDER:
                        found[base] = tar.extractfile(member).read()
                return found
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ConfigError(f"{str(root)!r} is not a readable tar archive ({exc}): expected {LAYOUT}", ("root",)) from None
    folder = root / FOLDER if (root / FOLDER).is_dir() else root
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


def parse_batch(raw: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one unpickled batch."""
    data, labels = raw.get("data"), raw.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise ConfigError(f"{name} lacks b'data' (a NumPy array) or b'labels' (it has keys {sorted(raw)}); "
                          f"expected {LAYOUT}", ("root",))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ConfigError(f"{name}: b'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072) rows of "
                          f"red, green and blue 32x32 planes", ("root",))
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: b'labels' is not a list of integers", ("root",)) from None
    if y.shape != (len(data),) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise ConfigError(f"{name}: b'labels' has shape {y.shape} with values outside 0..9 or a count other than "
                          f"the {len(data)} images", ("root",))
    return data.reshape(-1, 3, 32, 32), y


def load_cifar10(root: str | Path) -> dict[str, Any]:
    """``{"train": (x, y), "test": (x, y), "class_names": [...]}`` from `root` (see the module docstring)."""
    root = Path(root)
    files = read_files(root, [*TRAIN_FILES, TEST_FILE, META_FILE])
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if n not in files]
    if missing:
        raise ConfigError(f"{str(root)!r} lacks {', '.join(missing)}: expected {LAYOUT}", ("root",))
    parts = [parse_batch(load_pickle(files[n], n), n) for n in TRAIN_FILES]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = parse_batch(load_pickle(files[TEST_FILE], TEST_FILE), TEST_FILE)
    names = list(CLASS_NAMES)
    if META_FILE in files:
        meta = load_pickle(files[META_FILE], META_FILE)
        label_names = meta.get("label_names")
        if isinstance(label_names, list) and len(label_names) == 10:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in label_names]
    return {"train": train, "test": test, "class_names": names}


@attrs.define
class Cifar10Config:
    """Options of the cifar10 data source.

    Attributes:
        root: the cifar-10-batches-py folder, its parent, or cifar-10-python.tar.gz.
        form: "continuous" (floats in [-1, 1]) or "discrete" (pixel levels 0..255 as tokens, vocabulary 256).
        conditional: provide class labels ``y`` (10 classes).
        flip: random horizontal flips of training images (seeded per step).
        reference: held-out examples for evaluation: "test" (the 10000 test images) or "train"
            (the training images: the published FID protocol).
        max_train: use only the first N training images (0: all 50000).
        num_workers: background threads assembling upcoming batches (0: on demand).
    """

    root: str
    form: Literal["continuous", "discrete"] = "continuous"
    conditional: bool = False
    flip: bool = True
    reference: Literal["test", "train"] = "test"
    max_train: int = 0
    num_workers: int = 0

    def __attrs_post_init__(self) -> None:
        for key in ("max_train", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"expected a non-negative integer, got {getattr(self, key)!r}", (key,))


def _to_unit_range(x: np.ndarray) -> Tensor:
    return torch.from_numpy(x).float().div_(127.5).sub_(1.0)


def _to_tokens(x: np.ndarray) -> Tensor:
    return torch.from_numpy(x).long()


class Cifar10(ArraySource):
    """See the module docstring."""

    def __init__(self, config: Cifar10Config):
        self.config = config
        data = load_cifar10(config.root)
        (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
        if config.max_train:
            x_train, y_train = x_train[:config.max_train], y_train[:config.max_train]
        train = Split(x_train, y_train)
        held_out = train if config.reference == "train" else Split(x_test, y_test)
        discrete = config.form == "discrete"
        spec = DataSpec(shape=(3, 32, 32), kind=config.form, num_classes=10 if config.conditional else 0,
                        vocab_size=256 if discrete else 0,
                        extra={"class_names": data["class_names"], "source": str(config.root),
                               "train_examples": len(train), "held_out_examples": len(held_out)})
        super().__init__(train, held_out, spec, _to_tokens if discrete else _to_unit_range,
                         flip=config.flip, num_workers=config.num_workers)


def make_cifar10(config: Cifar10Config) -> Cifar10:
    """Data factory for ``plugin = "cifar10"``."""
    return Cifar10(config)
