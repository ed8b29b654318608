"""Images in a class-per-folder tree, decoded by a torch DataLoader with worker processes.

Expected layout (``root``; the layout of ImageNet's train/ and torchvision's ``ImageFolder``)::

    root/
        CLASS_A/  img001.png  img002.jpg  sub/img003.jpeg ...
        CLASS_B/  ...

Labels are the indices of the class folders in sorted order (``spec.extra["class_names"]``).
Image files end in .png, .jpg, .jpeg, .bmp or .webp (any case); other files are ignored.

Each image is converted to RGB (or grey with ``channels = 1``) and resized and
center-cropped to ``resolution`` x ``resolution`` the way guided-diffusion and DiT
do (``center_crop_arr``: halve with a box filter while the short side is at least
twice the target, then bicubic to the target, then crop the center). Continuous
form: ``x (B, C, R, R)`` float32 in [-1, 1]; discrete: int64 pixel levels 0..255
(vocabulary 256). Labels ``y (B,)`` with ``conditional = true``.

Batches are a pure function of (seed, step, rank, world size): the DataLoader's
batch sampler is `core.data.StepBatchSampler`, and the horizontal flips of
``flip = true`` come from `plugins.data.npz.flip_mask` (drawn per step for the
global batch). Decoding runs in ``num_workers`` processes, each holding
``prefetch_factor`` batches ahead, into pinned memory when CUDA is available.

Held-out images: a second tree (``held_out``; its class folders must be among the
training ones), else a seeded ``held_out_fraction`` of every class (0: none held
out; `reference` draws training images).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
import torch
from torch import Tensor

from core.data import StepBatchSampler, reference_index
from core.interfaces import Batch, DataSource, DataSpec
from registry import ConfigError

from .npz import flip_mask, render_images, split_fraction

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LAYOUT = "a class-per-folder tree: ROOT/CLASS_NAME/IMAGE.png (or .jpg, .jpeg, .bmp, .webp), one folder per class"


def center_crop_arr(image, resolution: int) -> np.ndarray:
    """guided-diffusion's resize-and-center-crop of a PIL image to ``(resolution, resolution[, C])`` uint8."""
    from PIL import Image

    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def scan(root: Path, where: tuple[str, ...], classes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(class names, image files, labels) of the tree at `root`; with `classes`, label by those names."""
    if not root.is_dir():
        raise ConfigError(f"no folder {str(root)!r}: expected {LAYOUT}", where)
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        loose = sum(1 for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(EXTENSIONS))
        hint = f" (it holds {loose} images directly: move them into a class folder such as {root}/all/)" if loose else ""
        raise ConfigError(f"{str(root)!r} has no class folders{hint}: expected {LAYOUT}", where)
    names = classes if classes is not None else folders
    index = {name: i for i, name in enumerate(names)}
    files, labels = [], []
    for folder in folders:
        if folder not in index:
            raise ConfigError(f"class folder {folder!r} of {str(root)!r} is not among the training classes "
                              f"({', '.join(names[:10])}{' ...' if len(names) > 10 else ''})", where)
        found = []
        for parent, dirs, entries in os.walk(root / folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(parent, e) for e in sorted(entries) if e.lower().endswith(EXTENSIONS)]
        if not found:
            raise ConfigError(f"class folder {str(root / folder)!r} holds no images: expected {LAYOUT}", where)
        files += found
        labels += [index[folder]] * len(found)
    return names, files, labels


class ImageFiles(torch.utils.data.Dataset):
    """Decodes ``(index, flip)`` items into ``(uint8 image (C, R, R), label)``."""

    def __init__(self, files: list[str], labels: list[int], resolution: int, channels: int):
        self.files, self.labels = files, labels
        self.resolution, self.mode = resolution, "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[Tensor, int]:
        index, flip = item
        from PIL import Image

        path = self.files[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image.load()
                    arr = center_crop_arr(image.convert(self.mode), self.resolution)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ConfigError(f"refused image {path!r}: it is larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} "
                              f"pixels (PIL.Image.MAX_IMAGE_PIXELS), a possible decompression bomb ({exc})", ("root",)) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ConfigError(f"cannot decode image {path!r}: {exc}", ("root",)) from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if flip:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C")), self.labels[index]


def without_worker_traceback(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Iterate a DataLoader; a `ConfigError` raised in a worker is re-raised with its message only.

    torch re-raises a worker's exception as ``ConfigError("Caught ConfigError in DataLoader worker
    process N. Original Traceback ...")``; the last line of that text is the original message.
    """
    try:
        yield from loader
    except ConfigError as exc:
        if "Original Traceback" not in exc.message:
            raise
        last = exc.message.strip().splitlines()[-1]
        raise ConfigError(last.partition("ConfigError: ")[2] or last) from None


def collate(items: list[tuple[Tensor, int]], discrete: bool, conditional: bool) -> dict[str, Tensor]:
    """Stack decoded images into a batch (in the worker, so pinned memory holds the final tensors)."""
    x = torch.stack([image for image, _ in items])
    batch = {"x": x.long() if discrete else x.float().div_(127.5).sub_(1.0)}
    if conditional:
        batch["y"] = torch.tensor([label for _, label in items], dtype=torch.int64)
    return batch


class FlipBatches(torch.utils.data.Sampler):
    """Wraps a `StepBatchSampler`: each index becomes ``(index, flip)`` with the step's seeded flip."""

    def __init__(self, steps: StepBatchSampler, flip: bool):
        self.steps, self.flip = steps, flip

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        s = self.steps
        for step, indices in enumerate(s, start=s.start_step):
            flips = (flip_mask(s.seed, step, s.batch_size, s.rank, s.world_size).tolist() if self.flip
                     else [False] * len(indices))
            yield list(zip(indices, flips))


@attrs.define
class ImageFolderConfig:
    """Options of the imagefolder data source.

    Attributes:
        root: the training tree (ROOT/CLASS_NAME/IMAGE.png|jpg).
        resolution: side of the square images after resizing and center-cropping.
        channels: 3 (RGB) or 1 (grey).
        form: "continuous" (floats in [-1, 1]) or "discrete" (pixel levels 0..255 as tokens).
        conditional: provide class labels ``y`` (one class per folder).
        flip: random horizontal flips of training images (seeded per step).
        held_out: a tree of held-out images with the same class folders (empty: split ``root``).
        held_out_fraction: share of every class held out when ``held_out`` is empty
            (0: nothing held out, `reference` draws training images).
        split_seed: seed of that split.
        num_workers: DataLoader worker processes decoding images (0: decode in the training process).
        prefetch_factor: batches each worker prepares ahead.
    """

    root: str
    resolution: int = 64
    channels: int = 3
    form: Literal["continuous", "discrete"] = "continuous"
    conditional: bool = True
    flip: bool = True
    held_out: str = ""
    held_out_fraction: float = 0.1
    split_seed: int = 0
    num_workers: int = 4
    prefetch_factor: int = 2

    def __attrs_post_init__(self) -> None:
        checks = [(self.resolution > 0, "resolution", "a positive integer"),
                  (self.channels in (1, 3), "channels", "1 (grey) or 3 (RGB)"),
                  (0.0 <= self.held_out_fraction < 1.0, "held_out_fraction", "a fraction in [0, 1)"),
                  (self.num_workers >= 0, "num_workers", "a non-negative integer"),
                  (self.prefetch_factor > 0, "prefetch_factor", "a positive integer")]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, key)!r}", (key,))


class ImageFolder(DataSource):
    """See the module docstring."""

    def __init__(self, config: ImageFolderConfig):
        self.config = c = config
        classes, files, labels = scan(Path(c.root), ("root",))
        if c.held_out:
            _, test_files, test_labels = scan(Path(c.held_out), ("held_out",), classes)
            train = (files, labels)
            test = (test_files, test_labels)
        elif c.held_out_fraction > 0:
            rows_train, rows_test = split_fraction(len(files), c.held_out_fraction, c.split_seed, np.asarray(labels))
            if len(rows_test) == 0:
                raise ConfigError(f"held_out_fraction {c.held_out_fraction} of {len(files)} images holds none out",
                                  ("held_out_fraction",))
            train = ([files[i] for i in rows_train], [labels[i] for i in rows_train])
            test = ([files[i] for i in rows_test], [labels[i] for i in rows_test])
        else:
            train = test = (files, labels)
        self.train = ImageFiles(*train, c.resolution, c.channels)
        self.held_out = ImageFiles(*test, c.resolution, c.channels)
        discrete = c.form == "discrete"
        self.spec = DataSpec(shape=(c.channels, c.resolution, c.resolution), kind=c.form,
                             num_classes=len(classes) if c.conditional else 0, vocab_size=256 if discrete else 0,
                             extra={"class_names": classes, "source": str(c.root),
                                    "train_examples": len(self.train), "held_out_examples": len(self.held_out)})
        self._collate = functools.partial(collate, discrete=discrete, conditional=c.conditional)

    @property
    def num_examples(self) -> int:
        """Number of training images (an epoch is this many examples)."""
        return len(self.train)

    def _loader(self, dataset: ImageFiles, batch_sampler) -> torch.utils.data.DataLoader:
        workers = self.config.num_workers
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=self._collate,
                                           num_workers=workers, prefetch_factor=self.config.prefetch_factor if workers else None,
                                           pin_memory=torch.cuda.is_available())

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        steps = StepBatchSampler(len(self.train), batch_size, seed, start_step, rank, world_size)
        yield from without_worker_traceback(self._loader(self.train, FlipBatches(steps, self.config.flip)))

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return self._held_out_rows(reference_index(len(self.held_out), n, generator).tolist())

    def reference_slice(self, n: int, seed: int, start: int, stop: int) -> Batch:
        index = reference_index(len(self.held_out), n, torch.Generator().manual_seed(seed))
        return self._held_out_rows(index[start:stop].tolist())

    def _held_out_rows(self, index: list[int]) -> Batch:
        chunk = 256
        batches = [[(i, False) for i in index[k:k + chunk]] for k in range(0, len(index), chunk)]
        parts = list(without_worker_traceback(self._loader(self.held_out, batches)))
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def render(self, batch: Batch, path: str) -> list[str]:
        x = batch["x"]
        if self.spec.kind == "discrete":
            x = x.float() / 127.5 - 1.0
        return render_images(x, batch.get("y"), path, (-1.0, 1.0))


def make_imagefolder(config: ImageFolderConfig) -> ImageFolder:
    """Data factory for ``plugin = "imagefolder"``."""
    return ImageFolder(config)
