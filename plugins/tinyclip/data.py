"""Image-caption data sources for CLIP training.

Batches are ``{"image": (B, C, H, W) float in [-1, 1], "text": (B, L) int64
token ids, "label": (B,) int64}`` (``label`` only when the data has classes).
Each source's ``spec`` is ``DataSpec(shape=(C, H, W), num_classes, vocab_size,
extra={...})`` with ``extra`` holding what models and metrics need:
``context_length``, ``eot_token``, ``tokenizer`` (a `WordTokenizer`),
``class_names`` and ``templates`` (zero-shot prompts, ``"a photo of a {}"``).

* ``clip_shapes`` — procedurally drawn coloured shapes, ``colour x shape x
  position``, captioned compositionally ("a red circle at the top left"), so
  telling captions apart needs the text tower to read colour, shape and
  position. Classes for zero-shot evaluation: ``color_shape`` (default),
  ``shape``, ``color`` or ``position``; the prompts ensemble the caption over
  the other attributes ("a red circle at the {position}" for every position).
* ``clip_digits`` — scikit-learn's 8x8 digits (through the registry's ``digits``
  data plugin), resized, captioned from templates ("a handwritten seven").
* ``clip_pairs`` — the files users bring: a CSV/TSV (``filepath,caption``
  columns, like open_clip's CsvDataset) or JSONL file (one object per line)
  of image paths (relative to the file) and captions, images read with PIL
  and resized to a square resolution.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import registry
from core.data import TensorDataSource
from core.data import generator as make_generator
from core.interfaces import DataSpec
from registry import ConfigError

from .tokenizer import WordTokenizer, words


class CaptionData(TensorDataSource):
    """In-memory image-caption pairs; see the module docstring.

    Args:
        train: ``{"image", "text", "label" (optional)}`` tensors of the training split.
        held_out: the same keys, never trained on.
        tokenizer: the tokenizer that made ``text``.
        class_names: names of the classes of ``label`` (empty: no classes).
        templates: zero-shot prompt templates with one ``{}``.
    """

    def __init__(self, train: Mapping[str, Tensor], held_out: Mapping[str, Tensor], tokenizer: WordTokenizer,
                 class_names: Sequence[str] = (), templates: Sequence[str] = ("a photo of a {}",)):
        self.tokenizer, self.class_names, self.templates = tokenizer, list(class_names), list(templates)
        spec = DataSpec(shape=tuple(train["image"].shape[1:]), kind="continuous", num_classes=len(self.class_names),
                        vocab_size=tokenizer.vocab_size,
                        extra={"context_length": tokenizer.context_length, "eot_token": tokenizer.eot,
                               "tokenizer": tokenizer, "class_names": self.class_names, "templates": self.templates})
        super().__init__(train, held_out, spec)


def _context_length(requested: int, captions: Sequence[str], key: str = "context_length") -> int:
    if requested < 0:
        raise ConfigError(f"expected a non-negative integer (0: longest caption + 2), got {requested}", (key,))
    return requested or max(len(words(c)) for c in captions) + 2


def _check_templates(templates: Sequence[str], key: str) -> None:
    for t in templates:
        if t.count("{}") != 1:
            raise ConfigError(f"each template needs exactly one '{{}}' for the class name, got {t!r}", (key,))


# --------------------------------------------------------------------------- shapes
COLORS = {"red": (0.95, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 1.0),
          "yellow": (0.95, 0.9, 0.15), "purple": (0.65, 0.2, 0.85), "cyan": (0.15, 0.85, 0.9)}
SHAPES = ("square", "circle", "triangle", "cross")
CAPTION = "a {color} {shape} at the {position}"


def position_names(grid: int) -> list[str]:
    """Names of the cells of a ``grid x grid`` layout, row-major ("top left", ..., "center", ...)."""
    rows = {1: [""], 2: ["top", "bottom"], 3: ["top", "middle", "bottom"]}[grid]
    cols = {1: [""], 2: ["left", "right"], 3: ["left", "center", "right"]}[grid]
    names = []
    for r in rows:
        for c in cols:
            name = " ".join(p for p in (r, c) if p)
            names.append({"middle center": "center", "middle left": "left", "middle right": "right",
                          "top center": "top", "bottom center": "bottom", "": "center"}.get(name, name))
    return names


def draw_shapes(color: Tensor, shape: Tensor, cell: Tensor, grid: int, size: int, g: torch.Generator,
                supersample: int = 2) -> Tensor:
    """Images ``(N, 3, size, size)`` in [0, 1]: one anti-aliased shape per image on a noisy dark background.

    Args:
        color, shape, cell: ``(N,)`` indices into `COLORS`, `SHAPES` and the grid cells (row-major).
    """
    n, fine = len(color), size * supersample
    step = size / grid
    jitter = (torch.rand(n, 2, generator=g) - 0.5) * 0.24 * step
    cy = (torch.div(cell, grid, rounding_mode="floor").float() + 0.5) * step + jitter[:, 0]
    cx = (cell % grid).float() * step + 0.5 * step + jitter[:, 1]
    radius = step * (0.3 + 0.1 * torch.rand(n, generator=g))
    coords = (torch.arange(fine).float() + 0.5) / supersample
    dy = (coords[None, :, None] - cy[:, None, None]) / radius[:, None, None]
    dx = (coords[None, None, :] - cx[:, None, None]) / radius[:, None, None]
    mask = torch.zeros(n, 1, fine, fine)
    for index, name in enumerate(SHAPES):
        pick = shape == index
        y, x = dy[pick], dx[pick]
        ax, ay = x.abs(), y.abs()
        if name == "square":
            m = (ax <= 0.85) & (ay <= 0.85)
        elif name == "circle":
            m = x * x + y * y <= 1.0
        elif name == "triangle":  # apex up
            m = (y >= -0.9) & (y <= 0.9) & (ax <= (y + 0.9) * 0.55)
        else:  # cross
            m = ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
        mask[pick, 0] = m.float()
    alpha = F.avg_pool2d(mask, supersample)
    rgb = torch.tensor(list(COLORS.values()))[color]
    rgb = (rgb + 0.08 * (torch.rand(n, 3, generator=g) - 0.5)).clamp(0, 1)
    background = 0.12 + 0.04 * torch.randn(n, 3, size, size, generator=g)
    return (background * (1 - alpha) + rgb[:, :, None, None] * alpha).clamp(0, 1)


@attrs.define
class ShapesConfig:
    """Options of ``clip_shapes``.

    Attributes:
        image_size: image side in pixels.
        grid: positions per side (1, 2 or 3): the shape sits in one cell of a grid x grid layout.
        train_size: number of training pairs.
        held_out_size: number of held-out pairs.
        classes: what zero-shot evaluation classifies: "color_shape", "shape", "color" or "position".
        context_length: tokens per caption (0: longest caption + 2).
        seed: seed of the drawing (the held-out pairs use a different stream).
    """

    image_size: int = 16
    grid: int = 2
    train_size: int = 5000
    held_out_size: int = 1000
    classes: Literal["color_shape", "shape", "color", "position"] = "color_shape"
    context_length: int = 0
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.grid not in (1, 2, 3):
            raise ConfigError(f"expected 1, 2 or 3, got {self.grid!r}", ("grid",))
        if self.image_size < 4 * self.grid:
            raise ConfigError(f"expected at least {4 * self.grid} pixels for a {self.grid}x{self.grid} grid, "
                              f"got {self.image_size}", ("image_size",))
        for key in ("train_size", "held_out_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expected a positive integer, got {getattr(self, key)!r}", (key,))


class Shapes(CaptionData):
    """``clip_shapes``: see the module docstring."""

    def __init__(self, config: ShapesConfig):
        self.config = config
        colors, positions = list(COLORS), position_names(config.grid)
        vocabulary = sorted({w for name in ("a at the", *colors, *SHAPES, *positions) for w in words(name)})
        longest = max(positions, key=lambda p: len(words(p)))
        tokenizer = WordTokenizer(vocabulary, _context_length(
            config.context_length, [CAPTION.format(color=colors[0], shape=SHAPES[0], position=longest)]))
        # zero-shot classes, and prompts that fill in every value of the other attributes
        fill = {"color": colors, "shape": SHAPES, "position": positions}
        if config.classes == "color_shape":
            class_names = [f"{c} {s}" for c in colors for s in SHAPES]
            templates = [f"a {{}} at the {p}" for p in positions]
        else:
            class_names = list(fill[config.classes])
            others = [k for k in fill if k != config.classes]
            templates = [CAPTION.format(**{config.classes: "{}", others[0]: x, others[1]: y})
                         for x in fill[others[0]] for y in fill[others[1]]]
        splits = {}
        for split, n in (("train", config.train_size), ("held_out", config.held_out_size)):
            g = make_generator(config.seed, "clip-shapes", split)
            color = torch.randint(len(colors), (n,), generator=g)
            shape = torch.randint(len(SHAPES), (n,), generator=g)
            cell = torch.randint(len(positions), (n,), generator=g)
            image = draw_shapes(color, shape, cell, config.grid, config.image_size, g) * 2 - 1
            captions = [CAPTION.format(color=colors[c], shape=SHAPES[s], position=positions[p])
                        for c, s, p in zip(color.tolist(), shape.tolist(), cell.tolist())]
            label = {"color_shape": color * len(SHAPES) + shape, "shape": shape, "color": color,
                     "position": cell}[config.classes]
            splits[split] = {"image": image, "text": tokenizer.encode(captions), "label": label}
        super().__init__(splits["train"], splits["held_out"], tokenizer, class_names, templates)


# --------------------------------------------------------------------------- digits
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {}", "a blurry picture of a {}")


@attrs.define
class DigitsCaptionConfig:
    """Options of ``clip_digits``.

    Attributes:
        image_size: images are resized (bilinear) from 8x8 to this side.
        held_out: fraction held out for evaluation (stratified, as in the ``digits`` data plugin).
        templates: caption templates, one ``{}`` for the digit's name; also the zero-shot prompts.
        seed: seed of the choice of template per image.
    """

    image_size: int = 16
    held_out: float = 0.2
    templates: list[str] = attrs.Factory(lambda: list(DIGIT_TEMPLATES))
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"expected at least 8, got {self.image_size}", ("image_size",))
        if not self.templates:
            raise ConfigError("expected at least one template", ("templates",))
        _check_templates(self.templates, "templates")


class DigitsCaptions(CaptionData):
    """``clip_digits``: see the module docstring."""

    def __init__(self, config: DigitsCaptionConfig):
        self.config = config
        digits = registry.build("data", {"plugin": "digits", "form": "continuous", "conditional": True,
                                         "held_out": config.held_out})
        all_captions = [t.format(n) for t in config.templates for n in DIGIT_NAMES]
        tokenizer = WordTokenizer.from_texts(all_captions, _context_length(0, all_captions))
        splits = {}
        for split, part in (("train", digits.train), ("held_out", digits.held_out)):
            x, y = part["x"], part["y"]
            image = F.interpolate(x, size=(config.image_size,) * 2, mode="bilinear", align_corners=False)
            template = torch.randint(len(config.templates), (len(y),), generator=make_generator(config.seed, split))
            captions = [config.templates[t].format(DIGIT_NAMES[c]) for t, c in zip(template.tolist(), y.tolist())]
            splits[split] = {"image": image.clamp(-1, 1), "text": tokenizer.encode(captions), "label": y}
        super().__init__(splits["train"], splits["held_out"], tokenizer, DIGIT_NAMES, config.templates)


# --------------------------------------------------------------------------- user files
@attrs.define
class PairsConfig:
    """Options of ``clip_pairs``: image-caption pairs from a CSV/TSV or JSONL file.

    Attributes:
        train: the training file (.csv, .tsv or .jsonl); image paths are relative to its folder.
        held_out: a held-out file of the same format (empty: hold out ``held_out_fraction`` of ``train``).
        held_out_fraction: share of ``train`` held out when ``held_out`` is empty.
        image_key: column / JSON key of the image path.
        caption_key: column / JSON key of the caption.
        label_key: optional column / key of a class label (an index, or a name from ``class_names``).
        class_names: class names for zero-shot evaluation (labels may be given as these names).
        templates: zero-shot prompt templates, one ``{}`` each.
        separator: CSV field separator (empty: "," for .csv, tab for .tsv).
        image_size: images are resized (bicubic) to this square side.
        channels: 3 (RGB) or 1 (grey).
        context_length: tokens per caption (0: longest caption + 2).
        vocab_file: a vocabulary file, one word per line (empty: every word of the training captions).
        max_vocab: at most this many words when the vocabulary is built from the captions (0: all).
        seed: seed of the held-out split.
    """

    train: str
    held_out: str = ""
    held_out_fraction: float = 0.1
    image_key: str = "filepath"
    caption_key: str = "caption"
    label_key: str = ""
    class_names: list[str] = attrs.Factory(list)
    templates: list[str] = attrs.Factory(lambda: ["a photo of a {}"])
    separator: str = ""
    image_size: int = 32
    channels: int = 3
    context_length: int = 0
    vocab_file: str = ""
    max_vocab: int = 0
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"expected 1 or 3, got {self.channels!r}", ("channels",))
        if self.image_size < 1:
            raise ConfigError(f"expected a positive integer, got {self.image_size!r}", ("image_size",))
        if not self.held_out and not 0.0 < self.held_out_fraction < 1.0:
            raise ConfigError(f"expected a fraction in (0, 1), got {self.held_out_fraction!r}", ("held_out_fraction",))
        _check_templates(self.templates, "templates")


def read_pairs(path: str | Path, image_key: str = "filepath", caption_key: str = "caption", label_key: str = "",
               separator: str = "") -> list[dict[str, str]]:
    """Rows ``{"image": absolute path, "caption": str, "label": str (when label_key)}`` of a CSV/TSV/JSONL file.

    Raises:
        ConfigError: naming the file (and line) for a missing file, an unknown
            format, missing columns or keys, bad JSON, empty values or missing images.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pairs file not found: {path}")
    suffix = path.suffix.lower()
    keys = [k for k in (image_key, caption_key, label_key) if k]
    rows: list[tuple[int, Mapping]] = []
    if suffix in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}: line {number}: expected a JSON object with keys {keys}, got {line[:80]!r}")
            rows.append((number, obj))
    elif suffix in (".csv", ".tsv", ".txt"):
        sep = separator or ("\t" if suffix == ".tsv" else ",")
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter=sep)
            header = reader.fieldnames or []
            missing = [k for k in keys if k not in header]
            if missing:
                raise ConfigError(f"{path}: missing column(s) {missing}; the header has {header} "
                                  f"(separator {sep!r}; set image_key / caption_key / separator)")
            for number, row in enumerate(reader, start=2):
                if None in row or any(v is None for v in row.values()):
                    raise ConfigError(f"{path}: line {number}: expected {len(header)} fields separated by {sep!r}")
                rows.append((number, row))
    else:
        raise ConfigError(f"{path}: unknown format {suffix!r}; expected .csv, .tsv or .jsonl")
    if not rows:
        raise ConfigError(f"{path}: no image-caption pairs")
    out = []
    for number, row in rows:
        missing = [k for k in keys if k not in row]
        if missing:
            raise ConfigError(f"{path}: line {number}: missing key(s) {missing}")
        values = {k: row[k] for k in keys}
        if any(not isinstance(v, (str, int)) or str(v).strip() == "" for v in values.values()):
            raise ConfigError(f"{path}: line {number}: empty or non-text value in {values}")
        image = Path(str(values[image_key]))
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ConfigError(f"{path}: line {number}: image not found: {image}")
        entry = {"image": str(image), "caption": str(values[caption_key])}
        if label_key:
            entry["label"] = str(values[label_key])
        out.append(entry)
    return out


def load_images(paths: Sequence[str], size: int, channels: int) -> Tensor:
    """``(N, channels, size, size)`` floats in [-1, 1], read with PIL and resized (bicubic)."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB" if channels == 3 else "L").resize((size, size), Image.Resampling.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.float32).reshape(size, size, channels))
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"cannot read image {p}: {exc}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


class Pairs(CaptionData):
    """``clip_pairs``: see `PairsConfig` and the module docstring."""

    def __init__(self, config: PairsConfig):
        self.config = config
        try:
            train_rows = read_pairs(config.train, config.image_key, config.caption_key, config.label_key,
                                    config.separator)
        except ConfigError as exc:
            raise exc.within("train") from None
        if config.held_out:
            try:
                held_rows = read_pairs(config.held_out, config.image_key, config.caption_key, config.label_key,
                                       config.separator)
            except ConfigError as exc:
                raise exc.within("held_out") from None
        else:
            if len(train_rows) < 2:
                raise ConfigError(f"{config.train}: need at least 2 pairs to hold some out", ("train",))
            order = torch.randperm(len(train_rows), generator=make_generator(config.seed, "pairs-split")).tolist()
            n_held = min(len(train_rows) - 1, max(1, round(len(train_rows) * config.held_out_fraction)))
            held_rows = [train_rows[i] for i in order[:n_held]]
            train_rows = [train_rows[i] for i in sorted(order[n_held:])]
        captions = [r["caption"] for r in train_rows + held_rows]
        length = _context_length(config.context_length, captions)
        if config.vocab_file:
            tokenizer = WordTokenizer.from_file(config.vocab_file, length)
        else:
            prompts = [t.format(c) for t in config.templates for c in config.class_names]
            tokenizer = WordTokenizer.from_texts([r["caption"] for r in train_rows] + prompts, length, config.max_vocab)
        splits = {}
        for split, rows in (("train", train_rows), ("held_out", held_rows)):
            part = {"image": load_images([r["image"] for r in rows], config.image_size, config.channels),
                    "text": tokenizer.encode([r["caption"] for r in rows])}
            if config.label_key:
                part["label"] = torch.tensor([self._label(r["label"], split) for r in rows])
            splits[split] = part
        super().__init__(splits["train"], splits["held_out"], tokenizer, config.class_names, config.templates)

    def _label(self, value: str, split: str) -> int:
        names = self.config.class_names
        if value in names:
            return names.index(value)
        if value.lstrip("-").isdigit() and (not names or 0 <= int(value) < len(names)):
            return int(value)
        raise ConfigError(f"label {value!r} is neither a class name nor an index into class_names {names}",
                          ("held_out" if split == "held_out" and self.config.held_out else "train",))


def make_clip_digits(config: DigitsCaptionConfig) -> DigitsCaptions:
    """Data factory for ``plugin = "clip_digits"``."""
    return DigitsCaptions(config)


def make_clip_pairs(config: PairsConfig) -> Pairs:
    """Data factory for ``plugin = "clip_pairs"``."""
    return Pairs(config)


def make_clip_shapes(config: ShapesConfig) -> Shapes:
    """Data factory for ``plugin = "clip_shapes"``."""
    return Shapes(config)
