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
center-cropped, in [-1, 1] or (``pixels = "openai"``) normalised with OpenAI CLIP's mean and std. Held-out pairs come from their own shards. Captions use the word-level tokenizer
(a vocabulary of the training captions, read once at indexing) or CLIP's BPE (``tokenizer = "clip_bpe"``).
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
import torch
from torch import Tensor

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


def decode_image(data: bytes, size: int) -> Tensor:
    """``(3, size, size)`` float in [-1, 1]: RGB, short side resized to `size` (bicubic), center crop."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        array = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class ShardPairs(torch.utils.data.Dataset):
    """Example ``i`` -> ``(image (3, R, R), caption)``; one open file per shard and worker."""

    def __init__(self, pairs: list[tuple[Member, Member]], size: int):
        self.pairs, self.size = pairs, size
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

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        image, _ = self.pairs[i]
        return decode_image(image.read(self.handles), self.size), self.caption(i)

    def __getstate__(self) -> dict:
        return {"pairs": self.pairs, "size": self.size, "_handles": {}, "_pid": -1}  # files do not travel


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

    def __attrs_post_init__(self) -> None:
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
        self.train, self.held_out = ShardPairs(train, config.image_size), ShardPairs(held_out, config.image_size)
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
        yield from self._loader(self.train, StepBatchSampler(len(self.train), batch_size, seed, start_step, rank,
                                                             world_size))

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
