"""A deterministic word-level tokenizer for the offline caption data sets.

Text is lower-cased and split into words with the regular expression
``[a-z0-9]+`` (punctuation and other characters are dropped). The vocabulary
is a fixed list of words between four special tokens, laid out like OpenAI's
CLIP vocabulary (start and end of text are the two largest ids)::

    0        <pad>   padding after the end of the caption
    1        <unk>   any word not in the vocabulary
    2..V-3           the words, in vocabulary order
    V-2      <sot>   start of text, always the first token
    V-1      <eot>   end of text; the text tower pools its output at this position

Because ``<eot>`` is the largest id, pooling at the first ``<eot>`` and at the
largest id of a row (OpenAI's and Hugging Face's legacy rule) agree.

``encode(["a red circle"])`` gives ``[[sot, id(a), id(red), id(circle), eot, 0, ...]]``
of length ``context_length``; a caption with more than ``context_length - 2``
words is truncated and still ends with ``<eot>``.

A vocabulary file is plain text, one word per line, without the special tokens
(`WordTokenizer.save` writes one, `WordTokenizer.from_file` reads one).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from registry import ConfigError

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>", "<sot>", "<eot>")
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The words of `text` as the tokenizer sees them (lower case, ``[a-z0-9]+``)."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Maps captions to ``(N, context_length)`` LongTensors of token ids; see the module docstring.

    Args:
        vocabulary: the words (without special tokens), in id order; duplicates are an error.
        context_length: tokens per caption, ``<sot>`` and ``<eot>`` included (at least 3).
    """

    pad, unk = PAD, UNK

    def __init__(self, vocabulary: Sequence[str], context_length: int):
        if context_length < 3:
            raise ConfigError(f"context_length must be at least 3 (<sot>, a word, <eot>), got {context_length}")
        bad = [w for w in vocabulary if words(w) != [w]]
        if bad:
            raise ConfigError(f"vocabulary entries must be single lower-case words [a-z0-9]+, got {bad[:5]!r}")
        self.itos = ["<pad>", "<unk>", *vocabulary, "<sot>", "<eot>"]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            dupes = sorted(w for w, n in Counter(self.itos).items() if n > 1)
            raise ConfigError(f"vocabulary has duplicate words: {dupes[:5]!r}")
        self.context_length = context_length
        self.sot, self.eot = len(self.itos) - 2, len(self.itos) - 1

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @classmethod
    def from_texts(cls, texts: Iterable[str], context_length: int, max_vocab: int = 0) -> WordTokenizer:
        """A vocabulary of every word in `texts`, most frequent first (ties alphabetical); at most `max_vocab` words (0: all)."""
        counts = Counter(w for t in texts for w in words(t))
        ordered = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(ordered[:max_vocab] if max_vocab > 0 else ordered, context_length)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int) -> WordTokenizer:
        """Read a vocabulary file (one word per line; blank lines ignored)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"vocabulary file not found: {path}")
        entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        try:
            return cls([w for w in entries if w not in SPECIALS], context_length)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}") from None

    def save(self, path: str | Path) -> None:
        """Write the vocabulary (without special tokens), one word per line."""
        Path(path).write_text("\n".join(self.itos[2:-2]) + "\n", encoding="utf-8")

    def encode(self, texts: Sequence[str]) -> Tensor:
        """``(len(texts), context_length)`` int64 token ids."""
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        room = self.context_length - 2
        for i, text in enumerate(texts):
            ids = [self.stoi.get(w, UNK) for w in words(text)][:room]
            out[i, :len(ids) + 2] = torch.tensor([self.sot, *ids, self.eot])
        return out

    def decode(self, tokens: Tensor) -> list[str]:
        """Captions back from ``(N, L)`` ids (words between ``<sot>`` and the first ``<eot>``)."""
        texts = []
        for row in tokens.tolist():
            end = row.index(self.eot) if self.eot in row else len(row)
            texts.append(" ".join(self.itos[i] for i in row[:end] if i not in (PAD, self.sot)))
        return texts
