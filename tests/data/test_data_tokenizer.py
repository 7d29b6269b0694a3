"""Tokenizer training, round trips, saving/loading, and `wiola tokenizer`."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from wiola.cli import main
from wiola.data.tokenizer import BOS, EOS, PAD, UNK, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer
from wiola.errors import WiolaError

from .conftest import DOCUMENTS


def random_unicode(rng: random.Random, length: int) -> str:
    """Random text over many scripts and planes, including controls and whitespace (no surrogates)."""
    ranges = [(0x00, 0x7F), (0x80, 0x2FF), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F), (0x3040, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFE00, 0xFFFD), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    chars = []
    for _ in range(length):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_bpe_round_trips_arbitrary_unicode(bpe_dir):
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    assert tok.is_fast
    rng = random.Random(0)
    samples = DOCUMENTS + [random_unicode(rng, n) for n in (1, 7, 50, 400)] + ["", " ", "\n\n", "\x00\x01\x7f", "a  b\t\tc\r\n"]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Unseen scripts still encode (byte fallback) and never produce an unknown token.
    assert tok.unk_token is None
    assert all(i < len(tok) for i in tok.encode(random_unicode(rng, 200), add_special_tokens=False))


def test_bpe_special_tokens_and_vocab_size(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert len(tok) == 400
    # No special tokens are added automatically.
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)
    assert tok.eos_token_id not in tok.encode("x <|eos|> y", split_special_tokens=True)


def test_bpe_learns_merges():
    tok = train_tokenizer(["abcabc abcabc " * 50], kind="bpe", vocab_size=300)
    assert len(tok.encode("abcabc", add_special_tokens=False)) < 6


def test_char_tokenizer_round_trip_and_unknown(tmp_path):
    tok = train_tokenizer(DOCUMENTS, kind="char")
    chars = sorted(set("".join(DOCUMENTS)))
    assert len(tok) == 4 + len(chars)
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == [BOS, EOS, PAD, UNK]
    assert tok.convert_ids_to_tokens(list(range(4, 4 + len(chars)))) == chars  # sorted code points
    path = save_tokenizer(tok, tmp_path / "char")
    loaded = AutoTokenizer.from_pretrained(path)
    for text in DOCUMENTS + ["".join(chars)]:
        ids = loaded.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert len(ids) == len(text)  # one token per character, even for "<|eos|>" written in the text
        assert loaded.decode(ids) == text
    ids = loaded.encode("a☃b", add_special_tokens=False)  # the snowman is not in the corpus
    assert ids[1] == loaded.unk_token_id == 3
    assert loaded.decode(ids) == f"a{UNK}b"


def test_training_errors():
    with pytest.raises(WiolaError, match="too small"):
        train_tokenizer(DOCUMENTS, kind="bpe", vocab_size=100)
    with pytest.raises(WiolaError, match="no text"):
        train_tokenizer([], kind="char")
    with pytest.raises(WiolaError, match="unknown tokenizer kind"):
        train_tokenizer(DOCUMENTS, kind="wordpiece")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(WiolaError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WiolaError, match="could not load"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_hash_tracks_content(bpe_dir, tmp_path):
    copy = save_tokenizer(load_tokenizer(bpe_dir), tmp_path / "copy")
    assert tokenizer_hash(copy) == tokenizer_hash(save_tokenizer(load_tokenizer(copy), tmp_path / "copy2"))
    other = save_tokenizer(train_tokenizer(DOCUMENTS, kind="bpe", vocab_size=350), tmp_path / "other")
    assert tokenizer_hash(other) != tokenizer_hash(copy)


def test_tokenizer_command(text_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", str(text_corpus), str(out), "--kind", "bpe", "--vocab-size", "320"]) == 0
    assert "320 tokens" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 320 and tok.eos_token == EOS
    assert main(["tokenizer", str(text_corpus / "doc03.txt"), str(tmp_path / "char"), "--kind", "char"]) == 0
    char = AutoTokenizer.from_pretrained(tmp_path / "char")
    assert len(char) == 4 + len(set(DOCUMENTS[3]))


def test_tokenizer_command_user_errors(tmp_path, capsys):
    assert main(["tokenizer", str(tmp_path / "nope.txt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wiola tokenizer: error: corpus not found") and "\n" not in err
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["tokenizer", str(tmp_path / "empty.txt"), str(tmp_path / "out")]) == 2
    assert "contains no text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
