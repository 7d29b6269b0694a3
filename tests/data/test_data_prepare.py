"""`prepare`: shard contents, split rules and determinism, fingerprint skipping, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from wiola.data.manifest import token_dtype
from wiola.data.prepare import choose_val, prepare, single_document_cut
from wiola.data.tokenizer import tokenizer_hash, train_tokenizer
from wiola.errors import WiolaError

from .conftest import DOCUMENTS, write_text_corpus


def run(source, out, **options):
    options.setdefault("num_workers", 0)
    return prepare(str(source), out, progress=False, **options)


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def split_tokens(out: Path, name: str) -> np.ndarray:
    manifest = manifest_of(out)
    return np.fromfile(out / manifest["splits"][name]["file"], dtype=manifest["dtype"])


def pieces(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """Split a shard at eos tokens; every document must end with one."""
    assert tokens.size == 0 or tokens[-1] == eos
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends)]


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def test_shards_equal_direct_tokenisation(text_corpus, bpe_dir, tmp_path):
    out = tmp_path / "out"
    summary = run(text_corpus, out, tokenizer=str(bpe_dir), val_fraction=0.25)
    manifest = manifest_of(out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos = tok.eos_token_id
    assert manifest["eos_token_id"] == eos == 1 and manifest["vocab_size"] == len(tok) == 400
    assert manifest["dtype"] == "uint16" and manifest["split_method"] == "document-hash"
    assert manifest["tokenizer"]["sha256"] == tokenizer_hash(out / "tokenizer")

    val_texts = [tok.decode(p) for p in pieces(split_tokens(out, "val"), eos)]
    train_texts = [tok.decode(p) for p in pieces(split_tokens(out, "train"), eos)]
    # Every document lands, whole and in corpus order, in exactly one split.
    assert sorted(val_texts + train_texts) == sorted(DOCUMENTS)
    assert train_texts == [d for d in DOCUMENTS if d not in val_texts]
    assert val_texts == [d for d in DOCUMENTS if d in val_texts]
    # Token for token, each shard is its documents tokenised directly, each followed by eos
    # (the literal "<|eos|>" in one document is text, not a separator).
    for name, texts in (("train", train_texts), ("val", val_texts)):
        expected = [t for text in texts for t in encode(tok, text) + [eos]]
        assert split_tokens(out, name).tolist() == expected
        assert manifest["splits"][name]["num_tokens"] == len(expected) == summary[f"{name}_tokens"]
        assert manifest["splits"][name]["num_documents"] == len(texts)
    assert 1 <= len(val_texts) < len(DOCUMENTS) and summary["documents"] == len(DOCUMENTS)


def test_split_is_deterministic_across_runs_workers_and_order(text_corpus, tmp_path):
    a = run(text_corpus, tmp_path / "a", vocab_size=300, num_workers=0)
    run(text_corpus, tmp_path / "b", vocab_size=300, num_workers=2)
    for name in ("train.bin", "val.bin", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert manifest_of(tmp_path / "a") == manifest_of(tmp_path / "b")
    assert a["val_documents"] >= 1

    # The same documents in another order (and under other names) split the same way.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, text in enumerate(DOCUMENTS):
        (shuffled / f"{len(DOCUMENTS) - i:03d}-{i}.txt").write_text(text, encoding="utf-8", newline="")
    run(shuffled, tmp_path / "c", tokenizer=str(tmp_path / "a" / "tokenizer"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "a" / "tokenizer")
    val_a = {tok.decode(p) for p in pieces(split_tokens(tmp_path / "a", "val"), 1)}
    val_c = {tok.decode(p) for p in pieces(split_tokens(tmp_path / "c", "val"), 1)}
    assert val_a == val_c

    # Another seed gives another split.
    splits = {frozenset(np.flatnonzero(choose_val(np.random.default_rng(s).random(40), np.ones(40, dtype=np.int64), 0.25)))
              for s in range(5)}
    assert len(splits) == 5


def test_choose_val_rules():
    sizes = np.full(10, 100, dtype=np.int64)
    scores = np.linspace(0.05, 0.95, 10)
    assert choose_val(scores, sizes, 0.3).tolist() == [True] * 3 + [False] * 7
    assert choose_val(scores, sizes, 0.01).sum() == 1  # never empty
    assert choose_val(scores, sizes, 0.99).sum() == 9  # never everything
    # Sizes count: one big low-score document alone makes up the fraction.
    assert choose_val(scores, np.array([300] + [100] * 9), 0.25).tolist() == [True] + [False] * 9
    # Identical documents share a score and a split.
    assert choose_val(np.array([0.1, 0.5, 0.1, 0.9]), np.full(4, 10), 0.25).tolist() == [True, False, True, False]
    assert choose_val(np.full(3, 0.4), np.full(3, 10), 0.5).sum() == 1


def test_single_document_is_split_at_a_line_break(tmp_path, bpe_dir):
    text = "".join(f"line {i:03d} of the only document\n" for i in range(100))
    cut = single_document_cut(text, 0.2)
    assert text[:cut].endswith("line 079 of the only document\n") and text[cut:].startswith("line 080")
    assert single_document_cut("abcdefghij", 0.3) == 7  # no line break: at the character
    assert single_document_cut("abcdefgh\nij", 0.1) == 9
    with pytest.raises(WiolaError, match="single document"):
        single_document_cut("a", 0.1)

    (tmp_path / "one.txt").write_text(text)
    summary = run(tmp_path / "one.txt", tmp_path / "out", tokenizer=str(bpe_dir), val_fraction=0.2)
    manifest = manifest_of(tmp_path / "out")
    assert manifest["split_method"] == "single-document" and summary["documents"] == 1
    assert summary["train_documents"] == summary["val_documents"] == 1
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    assert tok.decode(pieces(split_tokens(tmp_path / "out", "train"), 1)[0]) == text[:cut]
    assert tok.decode(pieces(split_tokens(tmp_path / "out", "val"), 1)[0]) == text[cut:]

    run(tmp_path / "one.txt", tmp_path / "noval", tokenizer=str(bpe_dir), val_fraction=0.0)
    assert manifest_of(tmp_path / "noval")["splits"]["val"]["num_tokens"] == 0


def test_up_to_date_skip_and_rerun_on_change(text_corpus, bpe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first = run(text_corpus, out, tokenizer=str(bpe_dir))
    stamp = (out / "train.bin").stat().st_mtime_ns, (out / "train.bin").stat().st_ino
    capsys.readouterr()

    again = run(text_corpus, out, tokenizer=str(bpe_dir), num_workers=2)  # workers do not change the output
    assert again["up_to_date"] and "up to date" in capsys.readouterr().out
    assert ((out / "train.bin").stat().st_mtime_ns, (out / "train.bin").stat().st_ino) == stamp
    assert {k: again[k] for k in ("train_tokens", "val_tokens", "documents")} == {k: first[k] for k in ("train_tokens", "val_tokens", "documents")}

    # while a training run reads the data (a shared lock), an up-to-date prepare still answers (side-by-side
    # `wiola compare` processes on one OUT each prepare it), and a prepare that would rewrite it is refused
    from wiola.data.lock import shared_lock
    from wiola.errors import WiolaError

    reader = shared_lock(out, "wiola train")
    try:
        assert run(text_corpus, out, tokenizer=str(bpe_dir))["up_to_date"]
        with pytest.raises(WiolaError, match="in use by another wiola process"):
            run(text_corpus, out, tokenizer=str(bpe_dir), val_fraction=0.2)
    finally:
        reader.release()

    changed = text_corpus / "doc01.txt"
    changed.write_text("A completely different second document.\n")
    redo = run(text_corpus, out, tokenizer=str(bpe_dir))
    assert not redo["up_to_date"] and redo["train_tokens"] + redo["val_tokens"] != first["train_tokens"] + first["val_tokens"]

    assert run(text_corpus, out, tokenizer=str(bpe_dir))["up_to_date"]
    assert not run(text_corpus, out, tokenizer=str(bpe_dir), seed=7)["up_to_date"]
    assert not run(text_corpus, out, tokenizer=str(bpe_dir), seed=7, force=True)["up_to_date"]
    (out / "val.bin").unlink()
    assert not run(text_corpus, out, tokenizer=str(bpe_dir), seed=7)["up_to_date"]
    assert not run(text_corpus, out, seed=7, vocab_size=300)["up_to_date"]  # a trained tokenizer instead
    assert not any(p.name.startswith(".prepare-") for p in out.iterdir())


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path):
    marks = [chr(0x4E00 + i) for i in range(20)]  # one character unique to each document
    docs = [f"document number {i} carries the mark {mark}\n" + "common words again and again\n" * 3 for i, mark in enumerate(marks)]
    write_text_corpus(tmp_path / "corpus", docs)
    summary = run(tmp_path / "corpus", tmp_path / "out", tokenizer_kind="char", val_fraction=0.3)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    train_text = tok.decode(split_tokens(tmp_path / "out", "train").tolist(), skip_special_tokens=True)
    vocab_chars = {t for t in tok.get_vocab() if not t.startswith("<|")}
    assert vocab_chars == set(train_text)
    val_docs = [doc for doc, mark in zip(docs, marks) if mark not in vocab_chars]
    assert len(val_docs) == summary["val_documents"] >= 1
    vocab = tok.get_vocab()
    expected = [t for doc in val_docs for t in [vocab.get(c, tok.unk_token_id) for c in doc] + [tok.eos_token_id]]
    assert split_tokens(tmp_path / "out", "val").tolist() == expected  # characters unseen in train are <|unk|>


def test_non_utf8_bytes_are_counted(tmp_path, bpe_dir):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp_path / "c" / "b.txt").write_bytes(b"\xff\xfe\xfd broken start\n")
    (tmp_path / "c" / "c.txt").write_bytes("fine ünïcode\n".encode())
    summary = run(tmp_path / "c", tmp_path / "out", tokenizer=str(bpe_dir))
    assert summary["replaced_bytes"] == 4 == manifest_of(tmp_path / "out")["replaced_bytes"]


def test_errors_leave_no_output(tmp_path, bpe_dir):
    out = tmp_path / "out"
    with pytest.raises(WiolaError, match="corpus not found"):
        run(tmp_path / "missing", out)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(WiolaError, match="contains no text"):
        run(tmp_path / "empty.txt", out, tokenizer=str(bpe_dir))
    write_text_corpus(tmp_path / "corpus", DOCUMENTS[:3])
    with pytest.raises(WiolaError, match="val-fraction"):
        run(tmp_path / "corpus", out, val_fraction=1.0)
    with pytest.raises(WiolaError, match="tokenizer not found"):
        run(tmp_path / "corpus", out, tokenizer=str(tmp_path / "nope"))

    from transformers import PreTrainedTokenizerFast

    no_eos = train_tokenizer(DOCUMENTS, vocab_size=300)
    PreTrainedTokenizerFast(tokenizer_object=no_eos.backend_tokenizer).save_pretrained(tmp_path / "no-eos")
    with pytest.raises(WiolaError, match="no eos token"):
        run(tmp_path / "corpus", out, tokenizer=str(tmp_path / "no-eos"))
    assert not (out / "manifest.json").exists() and not list(out.glob(".prepare-*"))


def test_failed_rerun_keeps_the_previous_output(text_corpus, bpe_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(text_corpus, out, tokenizer=str(bpe_dir))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    import wiola.data.prepare as prep

    def broken(*args, **kwargs):
        raise RuntimeError("tokenisation crashed")

    monkeypatch.setattr(prep, "_write_splits", broken)
    with pytest.raises(RuntimeError):
        run(text_corpus, out, tokenizer=str(bpe_dir), seed=99)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer", "train.bin", "val.bin"]


def test_token_dtype():
    assert token_dtype(400) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_exact_split_matches_nanogpt(tmp_path):
    """--split-at exact cuts a lone document at character int(0.9 n), like nanoGPT's data[:int(n*0.9)]."""
    from wiola.data.prepare import prepare

    text = "".join(f"line {i} of a small corpus\n" for i in range(200)) + "tail"
    corpus = tmp_path / "one.txt"
    corpus.write_text(text)
    n = len(text)
    exact = prepare(str(corpus), tmp_path / "exact", tokenizer_kind="char", val_fraction=0.1, split_at="exact", progress=False)
    line = prepare(str(corpus), tmp_path / "line", tokenizer_kind="char", val_fraction=0.1, progress=False)
    # char tokenizer: one token per character, plus the eos after each piece
    assert exact["train_tokens"] == int(n * 0.9) + 1 and exact["val_tokens"] == n - int(n * 0.9) + 1
    assert line["train_tokens"] != exact["train_tokens"]
