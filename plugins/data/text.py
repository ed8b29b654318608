"""Character-level text from the Python standard library's own source files.

Every machine with Python has the corpus: the files named by ``files``
(paths relative to ``sysconfig.get_paths()["stdlib"]``, read in the order
given; the default is about 420 KB of long-lived modules). Their content
follows the Python version, which ``spec.extra`` records with a SHA-256 of
the corpus.

Characters are tokens: ``"\\n"`` and printable ASCII (``" "`` .. ``"~"``), 96
in all; any other character reads as ``"?"``. With ``mask_token = true`` the
vocabulary gains a mask token, id 96 (``spec.extra["mask_token"]``), for the
mixture path's mask source. Split: the last ``held_out`` fraction of every
file is held out. Examples are windows ``{"x": (B, seq_len)}`` (LongTensor) at
uniformly random offsets of the joined training (or held-out) text; a training
window's offset is a pure function of (seed, step, its global batch position)
(`core.rng`), so any number of processes sees the same global batch.

Pictures are text: `render` writes the decoded examples to ``PATH.txt`` and
any text attached with `attach` (e.g. infilling examples from the
``discrete_infill`` metric) to ``PATH-NAME.txt``.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import attrs
import torch
from torch import Tensor

from core import rng
from core.interfaces import Batch, DataSource, DataSpec
from registry import ConfigError

#: The characters, in token order.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = "?"
#: How a mask token, and a hidden (to be infilled) character, are shown.
MASK_CHAR = "\u2588"
SPAN_OPEN, SPAN_CLOSE = "\u00ab", "\u00bb"

DEFAULT_FILES = (
    "argparse.py", "bisect.py", "calendar.py", "contextlib.py", "dataclasses.py", "difflib.py",
    "fractions.py", "functools.py", "heapq.py", "string.py", "textwrap.py",
)


@attrs.define
class TextConfig:
    """Options of the text data source.

    Attributes:
        files: standard-library source files (relative to the stdlib directory) forming the corpus.
        seq_len: characters per example.
        held_out: fraction at the end of every file held out for evaluation.
        mask_token: add a mask token (id 96) to the vocabulary, for the mixture path's mask source.
    """

    files: list[str] = attrs.Factory(lambda: list(DEFAULT_FILES))
    seq_len: int = 64
    held_out: float = 0.1
    mask_token: bool = False

    def __attrs_post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"expected an integer of at least 2, got {self.seq_len!r}", ("seq_len",))
        if not 0.0 < self.held_out < 1.0:
            raise ConfigError(f"expected a fraction in (0, 1), got {self.held_out!r}", ("held_out",))
        if not self.files:
            raise ConfigError("expected at least one file", ("files",))


def encode(text: str) -> Tensor:
    """``text`` -> uint8 token ids ``(len(text),)``; characters outside `ALPHABET` read as ``"?"``."""
    table = {ch: i for i, ch in enumerate(ALPHABET)}
    unknown = table[UNKNOWN]
    return torch.tensor([table.get(ch, unknown) for ch in text], dtype=torch.uint8)


def read_corpus(files: list[str], held_out: float) -> tuple[str, str, str]:
    """(training text, held-out text, SHA-256 of the files) from the stdlib directory."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, test, digest = [], [], hashlib.sha256()
    for name in files:
        path = root / name
        if not path.is_file():
            raise ConfigError(f"no file {name!r} in the standard library directory {root}", ("files",))
        text = path.read_text(encoding="utf-8", errors="replace")
        digest.update(text.encode())
        cut = int(len(text) * (1.0 - held_out))
        train.append(text[:cut])
        test.append(text[cut:])
    return "\n".join(train), "\n".join(test), digest.hexdigest()


class Text(DataSource):
    """See the module docstring."""

    def __init__(self, config: TextConfig):
        self.config = config
        train, test, sha = read_corpus(config.files, config.held_out)
        self.train, self.test = encode(train), encode(test)
        for name, part in (("training", self.train), ("held-out", self.test)):
            if len(part) < config.seq_len:
                raise ConfigError(f"the {name} text ({len(part)} characters) is shorter than seq_len {config.seq_len}",
                                  ("seq_len",))
        extra = {"alphabet": ALPHABET, "corpus_sha256": sha, "python": platform.python_version(),
                 "train_chars": len(self.train), "held_out_chars": len(self.test)}
        if config.mask_token:
            extra["mask_token"] = len(ALPHABET)
        self.spec = DataSpec(shape=(config.seq_len,), kind="discrete",
                             vocab_size=len(ALPHABET) + config.mask_token, extra=extra)
        self.attached: dict[str, str] = {}

    def _windows(self, text: Tensor, n: int, generator: torch.Generator | None, start: Tensor | None = None) -> Tensor:
        """``(n, seq_len)`` windows of `text` at `start` ``(n, 1)`` (drawn with `generator` when None)."""
        length = self.config.seq_len
        if start is None:
            start = torch.randint(0, len(text) - length + 1, (n, 1), generator=generator)
        return text[start + torch.arange(length)].long()

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        step, high = start_step, len(self.train) - self.config.seq_len + 1
        while True:  # each window's start is its own draw, keyed by (seed, step, global batch position)
            start = rng.randint(rng.shard_seeds(seed, step, batch_size, rank), 0, high, (1,), "text/window")
            yield {"x": self._windows(self.train, batch_size, None, start)}
            step += 1

    def reference(self, n: int, generator: torch.Generator) -> Batch:
        return {"x": self._windows(self.test, n, generator)}

    # -- text in and out ----------------------------------------------------------------
    def decode(self, tokens: Tensor, hidden: Tensor | None = None, blank: bool = False) -> str:
        """Token ids ``(L,)`` -> text. The mask token reads as a block. With ``hidden`` (BoolTensor
        ``(L,)``) each hidden run is enclosed in guillemets, and with ``blank`` shown as blocks."""
        chars = [ALPHABET[i] if i < len(ALPHABET) else MASK_CHAR for i in tokens.tolist()]
        if hidden is None:
            return "".join(chars)
        out, inside = [], False
        for ch, h in zip(chars, hidden.tolist()):
            if h != inside:
                out.append(SPAN_OPEN if h else SPAN_CLOSE)
                inside = h
            out.append(MASK_CHAR if (h and blank) else ch)
        if inside:
            out.append(SPAN_CLOSE)
        return "".join(out)

    def attach(self, name: str, text: str) -> None:
        """Keep ``text`` to be written by the next `render` as ``PATH-NAME.txt``."""
        self.attached[name] = text

    def render(self, batch: Batch, path: str) -> list[str]:
        out = Path(str(path) + ".txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        parts = [f"===== sample {i} =====\n{self.decode(x)}\n" for i, x in enumerate(batch["x"])]
        out.write_text("\n".join(parts), encoding="utf-8")
        files = [str(out)]
        for name, text in self.attached.items():
            extra = Path(f"{path}-{name}.txt")
            extra.write_text(text, encoding="utf-8")
            files.append(str(extra))
        return files


def make_text(config: TextConfig) -> Text:
    """Data factory for ``plugin = "text"``."""
    return Text(config)
