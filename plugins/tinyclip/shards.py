"""``clip_shards``: image-caption pairs in webdataset-format tar shards, read lazily.

A shard is a plain ``.tar`` whose members are grouped by key (the name up to the first dot, as
webdataset does): ``KEY.jpg`` / ``KEY.jpeg`` / ``KEY.png`` / ``KEY.webp`` and ``KEY.txt`` (the caption,
UTF-8). Keys missing either part are skipped (counted in ``skipped``). The shards are indexed once
(member headers only: offset and size of each image and caption); an example is read by seeking into
its shard, so memory holds one batch, not the data set.

Batches are ``{"image": (B, 3, R, R) float in [-1, 1], "text": (B, L) int64}``, decoded by a torch
DataLoader in ``num_workers`` processes. Which examples make step ``s`` on rank ``r`` of ``W`` is
`core.data.StepBatchSampler` over the global example index (all shards in order): a pure function of
(seed, step, rank, world size), so a resumed run sees the batches an uninterrupted one would, and the
workers only decode what the sampler chose. Images are resized (short side to ``R``, bicubic) and
center-cropped (CLIP's evaluation transform; training images too unless ``train_crop = "random_resized"``:
RandomResizedCrop with ``crop_scale``, each example's crop drawn from its `core.rng` seed), in [-1, 1] or (``pixels = "openai"``) normalised with OpenAI CLIP's mean and std. Held-out pairs come from their own shards. Captions use the word-level tokenizer
(a vocabulary of the training captions, read once at indexing) or CLIP's BPE (``tokenizer = "clip_bpe"``).
"""

from __future__ import annotations

import glob
import io
import math
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
import torch
from torch import Tensor

from core import rng
from core.data import StepBatchSampler, reference_index
from core.interfaces import Batch, DataSource, DataSpec
from registry import ConfigError

from .data import _check_templates, _check_tokenizer, _context_length, make_tokenizer, normalize_pixels
from .tokenizer import WordTokenizer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@attrs.frozen
class Member:
    """Where one file of a shard lies: ``(shard path, data offset, size)``."""

    shard: str
    offset: int
    size: int

    def read(self, handles: dict[str, object]) -> bytes:
        fh = handles.get(self.shard)
        if fh is None:
            fh = handles[self.shard] = open(self.shard, "rb")  # noqa: SIM115 - kept open per worker
        fh.seek(self.offset)
        return fh.read(self.size)


def index_shards(pattern: str, key: str = "train") -> tuple[list[tuple[Member, Member]], int]:
    """``([(image, caption)] in shard and member order, number of keys skipped)`` of the shards matching
    `pattern` (a glob, or several separated by commas)."""
    paths = sorted(p for part in pattern.split(",") if part.strip() for p in glob.glob(part.strip()))
    if not paths:
        raise ConfigError(f"no shard matches {pattern!r}", (key,))
    pairs, skipped = [], 0
    for path in paths:
        groups: dict[str, dict[str, Member]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if info.isfile():
                        stem, dot, suffix = Path(info.name).name.partition(".")
                        base = str(Path(info.name).parent / stem)
                        groups.setdefault(base, {})["." + suffix.lower()] = Member(path, info.offset_data, info.size)
        except (tarfile.TarError, OSError) as exc:
            raise ConfigError(f"{path}: not a readable (uncompressed) tar shard ({exc})", (key,)) from None
        for parts in groups.values():
            image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
            if image is None or ".txt" not in parts:
                skipped += 1
                continue
            pairs.append((image, parts[".txt"]))
    if not pairs:
        raise ConfigError(f"the shards {pattern!r} hold no image-caption pair (KEY.jpg/png + KEY.txt)", (key,))
    return pairs, skipped


#: Crop attempts of RandomResizedCrop before its center-crop fallback (torchvision's 10).
CROP_ATTEMPTS = 10


def random_resized_crop_box(width: int, height: int, u: Tensor, scale: tuple[float, float] = (0.9, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of RandomResizedCrop (Szegedy et al. 2015; torchvision, open_clip's CLIP
    training with ``scale = (0.9, 1)``) from uniforms ``u (CROP_ATTEMPTS, 4)`` in (0, 1).

    Attempt ``a``: area ``A = W H (s0 + (s1 - s0) u_a0)``, aspect ``r = exp(log r0 + (log r1 - log r0) u_a1)``,
    ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))``; the first with ``w <= W, h <= H`` is placed at
    ``left = floor(u_a3 (W - w + 1))``, ``top = floor(u_a2 (H - h + 1))``. If none fits: the centered
    crop of the whole image with its aspect clamped to ``[r0, r1]``.
    """
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(CROP_ATTEMPTS):
        area = width * height * (scale[0] + (scale[1] - scale[0]) * float(u[a, 0]))
        aspect = math.exp(lo + (hi - lo) * float(u[a, 1]))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(float(u[a, 2]) * (height - h + 1)), height - h)
            left = min(int(float(u[a, 3]) * (width - w + 1)), width - w)
            return left, top, w, h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def decode_image(data: bytes, size: int, crop: tuple[Tensor, tuple[float, float]] | None = None) -> Tensor:
    """``(3, size, size)`` float in [-1, 1], RGB. Without `crop`: short side resized to `size` (bicubic),
    center crop (CLIP's evaluation transform). With ``crop = (u, scale)``: the `random_resized_crop_box` of
    uniforms ``u`` resized to ``size x size`` (bicubic; CLIP's training transform)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if crop is not None:
            left, top, w, h = random_resized_crop_box(im.size[0], im.size[1], crop[0], crop[1])
            im = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
            return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        scale = size / min(im.size)
        w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        array = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class CropSeedSampler(StepBatchSampler):
    """`StepBatchSampler`'s batches as ``(index, seed)`` pairs, ``seed`` the example's `core.rng.shard_seeds`
    (the trainer's ``batch["seeds"]``): its crop is a function of the run's seed, the step and its global
    position, not of the rank, the worker or the process count."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step, index in enumerate(super().__iter__(), self.start_step):
            seeds = rng.shard_seeds(self.seed, step, self.batch_size, self.rank).tolist()
            yield list(zip(index, seeds))


class ShardPairs(torch.utils.data.Dataset):
    """Example ``i`` -> ``(image (3, R, R), caption)``; one open file per shard and worker. With a
    `crop_scale`, key ``(i, seed)`` decodes a random resized crop drawn from ``seed`` (stream ``"crop"``)."""

    def __init__(self, pairs: list[tuple[Member, Member]], size: int, crop_scale: tuple[float, float] | None = None):
        self.pairs, self.size, self.crop_scale = pairs, size, crop_scale
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    @property
    def handles(self) -> dict[str, object]:
        """This process's open shard files. A forked DataLoader worker inherits the parent's files, whose
        offset the OS shares between processes (a seek in one moves the others' reads): it opens its own."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        return self._handles

    def __len__(self) -> int:
        return len(self.pairs)

    def caption(self, i: int) -> str:
        return self.pairs[i][1].read(self.handles).decode("utf-8").strip()

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, str]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        crop = None
        if seed is not None and self.crop_scale is not None:
            crop = (rng.uniform(torch.tensor([seed]), (CROP_ATTEMPTS, 4), "crop")[0], self.crop_scale)
        image, _ = self.pairs[i]
        return decode_image(image.read(self.handles), self.size, crop), self.caption(i)

    def __getstate__(self) -> dict:  # files do not travel
        return {"pairs": self.pairs, "size": self.size, "crop_scale": self.crop_scale, "_handles": {}, "_pid": -1}


@attrs.define
class ShardsConfig:
    """Options of ``clip_shards``.

    Attributes:
        train: glob of the training shards (several globs separated by commas), e.g. "data/cc/train-*.tar".
        held_out: glob of the held-out shards.
        image_size: images are resized and center-cropped to this square side.
        context_length: tokens per caption (0: longest training caption + 2, or 77 with "clip_bpe").
        templates: zero-shot prompt templates (no classes: shards carry no labels).
        num_workers: DataLoader worker processes decoding batches (0: in the training process).
        prefetch_factor: batches each worker prepares ahead.
        vocab_file: the word-level vocabulary, one word per line (empty: every word of the training captions).
        tokenizer: "word" or "clip_bpe" (CLIP's byte-level BPE read from ``bpe_vocab``).
        bpe_vocab: path of a ``bpe_simple_vocab_16e6.txt.gz``-format file (for ``tokenizer = "clip_bpe"``).
        pixels: "symmetric" ([-1, 1]) or "openai" (OpenAI CLIP's mean / std normalisation, for its weights).
        train_crop: "center" (training images like held-out ones) or "random_resized" (RandomResizedCrop
            with area fraction in crop_scale and aspect in [3/4, 4/3], open_clip's CLIP training).
        crop_scale: the area fractions [low, high] of "random_resized" (open_clip: [0.9, 1.0]).
    """

    train: str
    held_out: str
    image_size: int = 224
    context_length: int = 0
    templates: list[str] = attrs.Factory(lambda: ["a photo of a {}"])
    num_workers: int = 0
    prefetch_factor: int = 2
    vocab_file: str = ""
    tokenizer: Literal["word", "clip_bpe"] = "word"
    bpe_vocab: str = ""
    pixels: Literal["symmetric", "openai"] = "symmetric"
    train_crop: Literal["center", "random_resized"] = "center"
    crop_scale: list[float] = attrs.Factory(lambda: [0.9, 1.0])

    def __attrs_post_init__(self) -> None:
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"expected [low, high] with 0 < low <= high <= 1, got {self.crop_scale}", ("crop_scale",))
        _check_tokenizer(self)
        _check_templates(self.templates, "templates")
        if self.image_size < 1 or self.num_workers < 0 or self.prefetch_factor < 1:
            raise ConfigError("image_size and prefetch_factor must be positive, num_workers non-negative")


class Shards(DataSource):
    """``clip_shards``: see the module docstring."""

    def __init__(self, config: ShardsConfig):
        self.config = config
        train, self.skipped = index_shards(config.train, "train")
        held_out, skipped = index_shards(config.held_out, "held_out")
        self.skipped += skipped
        crop = tuple(config.crop_scale) if config.train_crop == "random_resized" else None
        self.train, self.held_out = ShardPairs(train, config.image_size, crop), ShardPairs(held_out, config.image_size)
        self.tokenizer = make_tokenizer(config, self._word_tokenizer)
        self.spec = DataSpec(shape=(3, config.image_size, config.image_size), kind="continuous", num_classes=0,
                             vocab_size=self.tokenizer.vocab_size,
                             extra={"context_length": self.tokenizer.context_length, "eot_token": self.tokenizer.eot,
                                    "tokenizer": self.tokenizer, "class_names": [], "templates": config.templates})

    def _word_tokenizer(self) -> WordTokenizer:
        captions = [self.train.caption(i) for i in range(len(self.train))]
        length = _context_length(self.config.context_length, captions)
        if self.config.vocab_file:
            return WordTokenizer.from_file(self.config.vocab_file, length)
        return WordTokenizer.from_texts(captions, length)

    @property
    def num_examples(self) -> int:
        return len(self.train)

    def _collate(self, items: list[tuple[Tensor, str]]) -> Batch:
        images = normalize_pixels(torch.stack([i for i, _ in items]), self.config.pixels)
        return {"image": images, "text": self.tokenizer.encode([c for _, c in items])}

    def _loader(self, dataset: ShardPairs, batch_sampler) -> torch.utils.data.DataLoader:
        workers = self.config.num_workers
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=self._collate,
                                           num_workers=workers,
                                           prefetch_factor=self.config.prefetch_factor if workers else None)

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        sampler = CropSeedSampler if self.train.crop_scale is not None else StepBatchSampler
        yield from self._loader(self.train, sampler(len(self.train), batch_size, seed, start_step, rank, world_size))

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return self._rows(reference_index(len(self.held_out), n, generator).tolist())

    def reference_slice(self, n: int, seed: int, start: int, stop: int) -> Batch:
        return self._rows(reference_index(len(self.held_out), n, torch.Generator().manual_seed(seed))[start:stop]
                          .tolist())

    def _rows(self, index: list[int]) -> Batch:
        if not index:
            return {"image": torch.empty(0, *self.spec.shape), "text": torch.empty(0, self.tokenizer.context_length,
                                                                                    dtype=torch.long)}
        return self._collate([self.held_out[i] for i in index])


def make_clip_shards(config: ShardsConfig) -> Shards:
    """Data factory for ``plugin = "clip_shards"``."""
    return Shards(config)
