"""OpenAI CLIP's byte-level BPE tokenizer (``SimpleTokenizer``), read from a local vocabulary file.

The vocabulary file is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` format: gzip'd
UTF-8 text whose first line is a header and whose following lines are merges
``"a b"`` in priority order (at most the first ``MAX_MERGES = 49152 - 256 - 2``
are used, as CLIP does). Plain (not gzip'd) text is accepted too. The ids are::

    0 .. 255      the 256 byte characters of `bytes_to_unicode` (byte b -> one printable character)
    256 .. 511    the same characters followed by '</w>' (a word's last symbol)
    512 ..        one token per merge, the concatenation of its two symbols
    V - 2, V - 1  '<|startoftext|>', '<|endoftext|>'   (V = 512 + merges + 2; 49408 for CLIP)

A caption is encoded as CLIP and open_clip do (without ftfy):

1. cleaning: ``html.unescape`` twice, strip; every whitespace run -> one space; lower case;
2. split with CLIP's pattern ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
   (the Unicode classes built from `unicodedata`, so no third-party regex module is needed);
3. each piece -> its UTF-8 bytes -> byte characters, '</w>' appended to the last, then merged
   greedily: repeatedly join every (non-overlapping, left to right) occurrence of the adjacent pair
   of lowest merge rank until no adjacent pair is a merge;
4. ``[sot] + ids + [eot]``, cut to ``context_length`` (77 for CLIP) with the last kept token
   replaced by ``eot`` (open_clip's truncation), padded with 0.

`BPETokenizer` has the interface of `plugins.tinyclip.tokenizer.WordTokenizer`
(``encode``, ``decode``, ``vocab_size``, ``context_length``, ``sot``, ``eot``, ``pad``).
"""

from __future__ import annotations

import functools
import gzip
import html
import re
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from registry import ConfigError

MAX_MERGES = 49152 - 256 - 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CLIP_CONTEXT_LENGTH = 77


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map of the 256 byte values to printable characters: the 188 printable
    Latin-1 bytes map to themselves, the others to ``chr(256 + n)`` in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _char_class(major: str) -> str:
    """A ``re`` character-class body matching every code point of Unicode major category `major` ('L', 'N')."""
    points = [cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == major]
    parts, start, prev = [], points[0], points[0]
    for cp in [*points[1:], -2]:
        if cp != prev + 1:  # a range [start, prev] ends
            parts.append(re.escape(chr(start)) + ("" if prev == start else "-" + re.escape(chr(prev))))
            start = cp
        prev = cp
    return "".join(parts)


@functools.cache
def clip_pattern() -> re.Pattern:
    """CLIP's split pattern with ``\\p{L}`` and ``\\p{N}`` spelled out for the standard ``re`` module."""
    letters, numbers = _char_class("L"), _char_class("N")
    return re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|"
                      rf"[^\s{letters}{numbers}]+", re.IGNORECASE)


def clean(text: str) -> str:
    """CLIP's ftfy-free cleaning: html-unescape twice, collapse whitespace to single spaces, strip, lower-case."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip().lower()


def read_merges(path: str | Path, key: str = "bpe_vocab") -> list[tuple[str, str]]:
    """The merges of a vocabulary file (first line a header; at most `MAX_MERGES`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"BPE vocabulary file not found: {path}", (key,))
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable (gzip'd) UTF-8 BPE vocabulary ({exc})", (key,)) from None
    merges = []
    for number, line in enumerate(text.split("\n")[1:MAX_MERGES + 1], start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{path}: line {number}: expected a merge 'a b', got {line[:80]!r}", (key,))
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ConfigError(f"{path}: no merges after the header line", (key,))
    return merges


class BPETokenizer:
    """CLIP's byte-level BPE; see the module docstring.

    Args:
        merges: ``(a, b)`` pairs in priority order (rank 0 merges first).
        context_length: tokens per caption, start and end tokens included (at least 2).
    """

    pad = 0

    def __init__(self, merges: Sequence[tuple[str, str]], context_length: int = CLIP_CONTEXT_LENGTH):
        if context_length < 2:
            raise ConfigError(f"context_length must be at least 2 (start and end of text), got {context_length}",
                              ("context_length",))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        self.itos = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(self.itos)}  # a repeated token keeps its last id, as CLIP
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}
        self.context_length = context_length
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = CLIP_CONTEXT_LENGTH, key: str = "bpe_vocab"
                  ) -> BPETokenizer:
        """Read a ``bpe_simple_vocab_16e6.txt.gz``-format file (see `read_merges`)."""
        return cls(read_merges(path, key), context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def bpe(self, piece: str) -> list[str]:
        """The symbols of one pre-tokenised piece (already byte characters), the last ending in '</w>'."""
        if piece in self.cache:
            return self.cache[piece].split(" ")
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[piece] = " ".join(word)
        return word

    def tokenize(self, text: str) -> list[int]:
        """The ids of `text` without start and end tokens (steps 1-3 of the module docstring)."""
        ids = []
        for piece in clip_pattern().findall(clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(piece))
        return ids

    def encode(self, texts: Sequence[str]) -> Tensor:
        """``(len(texts), context_length)`` int64 ids: ``[sot, ..., eot, 0, ...]``, truncated with ``eot`` last."""
        out = torch.full((len(texts), self.context_length), self.pad, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.tokenize(text), self.eot]
            if len(ids) > self.context_length:
                ids = [*ids[:self.context_length - 1], self.eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, tokens: Tensor) -> list[str]:
        """Texts back from ``(N, L)`` ids: the symbols between ``sot`` and the first ``eot``, '</w>' -> space."""
        texts = []
        for row in tokens.tolist():
            end = row.index(self.eot) if self.eot in row else len(row)
            symbols = "".join(self.itos[i] for i in row[:end] if i != self.sot)
            raw = bytes(self.byte_decoder[c] for c in symbols)
            texts.append(raw.decode("utf-8", errors="replace").replace("</w>", " ").strip())
        return texts
