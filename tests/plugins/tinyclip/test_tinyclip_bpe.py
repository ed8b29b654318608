"""CLIP's byte-level BPE tokenizer (plugins/tinyclip/bpe.py) against transformers' CLIPTokenizer.

The vocabulary is learnt here, from a small corpus, by a plain BPE trainer written from the
algorithm (count adjacent symbol pairs over byte-character words ending in '</w>', merge the most
frequent pair, repeat), and written in OpenAI's bpe_simple_vocab_16e6.txt.gz format.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.tinyclip.bpe import BPETokenizer, bytes_to_unicode, clean
from registry import ConfigError

CORPUS = ("a photo of a red circle at the top left. a blue square at the bottom right! the quick brown fox "
          "jumps over the lazy dog; hello world, hello there. it's a dog's life, they're here, we've seen "
          "i'm sure you'll see, he'd go. 0123456789 naïve café über straße ÉCOLE 東京 emoji 😀 (brackets) "
          "a-b_c \"quotes\" ?!... #hashtag @user").split()


def _byte_words(text_words: list[str]) -> Counter:
    encode = bytes_to_unicode()
    words: Counter = Counter()
    for w in text_words:
        symbols = [encode[b] for b in w.lower().encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    return words


def learn_merges(text_words: list[str], n: int) -> list[tuple[str, str]]:
    """Up to `n` BPE merges: the most frequent adjacent pair each time (ties: the larger pair)."""
    words, merges = _byte_words(text_words), []
    for _ in range(n):
        pairs: Counter = Counter()
        for w, count in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for w, count in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


MERGES = learn_merges(CORPUS * 3 + [w[:k] for w in CORPUS for k in range(2, len(w))], 300)


def write_vocab(path, merges, gz=True) -> None:
    text = "#version: 0.2 (header)\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    path.write_bytes(gzip.compress(text.encode("utf-8")) if gz else text.encode("utf-8"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(flowforge tokenizer read from the .txt.gz file, transformers' CLIPTokenizer on the same merges)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bpe")
    write_vocab(folder / "bpe_simple_vocab_16e6.txt.gz", MERGES)
    ours = BPETokenizer.from_file(folder / "bpe_simple_vocab_16e6.txt.gz")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(ours.itos)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:]]
    return ours, transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _hf_ids(hf, texts: list[str]) -> list[list[int]]:
    out = hf(texts, padding="max_length", max_length=77, truncation=True)
    return [ids[:sum(mask)] for ids, mask in zip(out["input_ids"], out["attention_mask"])]


def test_vocabulary_layout_follows_clip():
    tok = BPETokenizer(MERGES)
    assert len(MERGES) == 300
    assert tok.vocab_size == 256 + 256 + 300 + 2
    assert tok.itos[:256] == list(bytes_to_unicode().values())
    assert tok.itos[256] == tok.itos[0] + "</w>"
    assert tok.itos[512] == "".join(MERGES[0])
    assert (tok.sot, tok.eot) == (tok.vocab_size - 2, tok.vocab_size - 1)
    assert sorted(map(ord, bytes_to_unicode().values()))[:3] == [33, 34, 35]  # printable bytes are themselves


def test_hand_written_merges_give_the_expected_ids():
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("o</w>", "x"), ("hell", "o</w>")]  # the 4th never applies
    tok = BPETokenizer(merges, context_length=6)
    char = {c: i for i, c in enumerate(tok.itos[:256])}
    hello = 512 + 4  # "hello</w>" is the fifth merge
    assert tok.tokenize("Hello") == [hello]
    assert tok.tokenize("hell") == [512, char["l"], char["l"] + 256]  # "ll" needs both l's, the second is l</w>
    assert tok.encode(["hello hello hello hello hello"]).tolist() == [[tok.sot, hello, hello, hello, hello, tok.eot]]
    assert tok.encode(["hello!"]).tolist() == [[tok.sot, hello, char["!"] + 256, tok.eot, 0, 0]]


def test_cleaning_unescapes_html_twice_and_collapses_whitespace():
    assert clean("  A &amp;amp; B\t\n C  ") == "a & b c"
    assert clean("&lt;b&gt;") == "<b>"
    tok = BPETokenizer(MERGES)
    assert tok.tokenize("Fish &amp; chips") == tok.tokenize("fish & chips")
    assert tok.tokenize("<|endoftext|>") == [tok.eot]


@pytest.mark.parametrize("text", ["a photo of a red circle", "It's a DOG'S life!!", "naïve café 12345",
                                  "東京 😀 #hashtag", "", "   ", "they're    here\n\tand  we've gone"])
def test_examples_match_transformers(pair, text):
    ours, hf = pair
    assert ours.encode([text])[0, :len(_hf_ids(hf, [text])[0])].tolist() == _hf_ids(hf, [text])[0]


def test_truncation_keeps_the_end_token_last(pair):
    ours, hf = pair
    text = "the quick brown fox jumps over the lazy dog " * 20
    ids = ours.encode([text])[0]
    assert ids.shape == (77,) and ids[0] == ours.sot and ids[-1] == ours.eot and (ids != 0).all()
    assert ids.tolist() == _hf_ids(hf, [text])[0]
    short = ours.encode(["hello"])[0]
    end = short.tolist().index(ours.eot)
    assert (short[end + 1:] == 0).all()


ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFXYZ0123456789 .,!?;:'\"-()/#@_\t\n") +
                           ["é", "ï", "ß", "ü", "東", "京", "😀", "ñ", "'s", "'re", "'ll"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ALPHABET, max_size=60).map("".join))
def test_random_text_matches_transformers(pair, text):
    ours, hf = pair
    expected = _hf_ids(hf, [text])[0]
    got = ours.encode([text])[0]
    assert got[:len(expected)].tolist() == expected
    assert (got[len(expected):] == 0).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(list("abcdefghijklmnopqrstuvwxyz0123456789 ")), max_size=40).map("".join))
def test_decode_inverts_encode_up_to_spacing(text):
    tok = BPETokenizer(MERGES)
    assert tok.decode(tok.encode([text]))[0].replace(" ", "") == text.replace(" ", "")


def test_plain_text_vocabulary_and_bad_files_are_config_errors(tmp_path):
    write_vocab(tmp_path / "plain.txt", MERGES[:10], gz=False)
    assert BPETokenizer.from_file(tmp_path / "plain.txt").vocab_size == 512 + 10 + 2
    with pytest.raises(ConfigError, match="not found"):
        BPETokenizer.from_file(tmp_path / "missing.txt.gz")
    (tmp_path / "bad.txt").write_text("#header\na b c\n")
    with pytest.raises(ConfigError, match="line 2"):
        BPETokenizer.from_file(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("#header\n")
    with pytest.raises(ConfigError, match="no merges"):
        BPETokenizer.from_file(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="context_length"):
        BPETokenizer(MERGES, context_length=1)
    assert isinstance(BPETokenizer(MERGES).encode(["x"]), torch.Tensor)


def test_clip_data_can_use_the_bpe_tokenizer_and_feed_a_clip(tmp_path):
    import registry

    write_vocab(tmp_path / "vocab.txt.gz", MERGES)
    data = registry.build("data", {"plugin": "clip_shapes", "train_size": 8, "held_out_size": 4,
                                   "tokenizer": "clip_bpe", "bpe_vocab": str(tmp_path / "vocab.txt.gz")})
    tok = data.spec.extra["tokenizer"]
    assert isinstance(tok, BPETokenizer) and data.spec.vocab_size == tok.vocab_size == 512 + 300 + 2
    assert data.spec.extra["context_length"] == 77 and data.spec.extra["eot_token"] == tok.eot
    text = data.train["text"]
    assert text.shape == (8, 77) and (text[:, 0] == tok.sot).all()
    assert all(c.startswith("a ") and " at the " in c for c in tok.decode(text))
    model = registry.build("backbone", {"plugin": "clip", "width": 32, "depth": 1, "embed_dim": 8}, spec=data.spec)
    image_emb, text_emb, _ = model(data.train["image"][:2], text[:2])
    assert image_emb.shape == text_emb.shape == (2, 8)
    word = registry.build("data", {"plugin": "clip_shapes", "train_size": 8, "held_out_size": 4})
    assert not isinstance(word.spec.extra["tokenizer"], BPETokenizer)  # the default is unchanged
    with pytest.raises(ConfigError, match="bpe_vocab"):
        registry.build("data", {"plugin": "clip_digits", "tokenizer": "clip_bpe"})
