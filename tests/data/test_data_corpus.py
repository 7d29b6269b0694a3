"""Corpus sources: text, jsonl, parquet, directories, globs, Hugging Face datasets, errors."""

from __future__ import annotations

import json
import os

import pytest

from wiola.data.corpus import Corpus, decode_utf8, iter_documents
from wiola.errors import WiolaError

from .conftest import DOCUMENTS


def texts(source, **options) -> list[str]:
    return list(iter_documents(str(source), **options))


def test_decode_utf8_counts_each_invalid_byte():
    assert decode_utf8("héllo".encode()) == ("héllo", 0)
    text, bad = decode_utf8(b"ab\xffc\xc3(\xe2\x82 \xed\xa0\x80" + "é".encode())
    assert bad == 1 + 1 + 2 + 3  # \xff, truncated \xc3, truncated \xe2\x82, an encoded surrogate
    assert text == "ab\ufffdc\ufffd(\ufffd\ufffd \ufffd\ufffd\ufffdé"


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\n\nline two\r\n")
    docs = list(Corpus(str(path)))
    assert [(d.id, d.text) for d in docs] == [(str(path), "line one\n\nline two\r\n")]  # BOM dropped, rest verbatim


def test_txt_doc_separator(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first\npara\n\n\n  \nsecond para\n\nthird\n\n")
    assert texts(path, doc_separator=r"\n\s*\n") == ["first\npara", "second para", "third"]
    with pytest.raises(WiolaError, match="doc-separator"):
        Corpus(str(path), doc_separator="(")


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 and \xff\xfe end")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x\x80y"}\n{"text": "ok"}\n')
    corpus = Corpus(str(tmp_path))
    assert [d.text for d in corpus] == ["caf\ufffd and \ufffd\ufffd end", "x\ufffdy", "ok"]
    assert corpus.replaced_bytes == 4
    list(corpus)
    assert corpus.replaced_bytes == 4  # counted per pass, not accumulated


def test_jsonl_column_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "body": "one"}, {"text": "b", "body": "two"}, {"text": None, "body": "three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert texts(path) == ["a", "b"]  # null texts are skipped
    assert texts(path, column="body") == ["one", "two", "three"]
    assert [d.id for d in Corpus(str(path))] == [f"{path}:1", f"{path}:2"]
    with pytest.raises(WiolaError, match=r"d\.jsonl:1: no 'content' field"):
        texts(path, column="content")
    path.write_text('{"text": "a"}\n{broken\n')
    with pytest.raises(WiolaError, match=r"d\.jsonl:2: invalid JSON"):
        texts(path)
    path.write_text('{"text": 5}\n')
    with pytest.raises(WiolaError, match="holds int, not text"):
        texts(path)


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": DOCUMENTS[:5], "n": list(range(5))}), path, row_group_size=2)
    assert texts(path, column="content") == DOCUMENTS[:5]
    with pytest.raises(WiolaError, match="no column 'text'"):
        texts(path)


def test_directory_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    root = tmp_path / "root"
    (root / "b" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b" / "deeper" / "z.txt").write_text("z")
    (root / "b" / "a.txt").write_text("b/a")
    (root / "a.jsonl").write_text('{"text": "a.jsonl"}\n')
    (root / "c.TXT").write_text("upper")
    (root / "notes.md").write_text("not read")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "x.txt").write_text("git")
    docs = list(Corpus(str(root)))
    assert [d.text for d in docs] == ["a.jsonl", "b/a", "z", "upper"]
    assert [d.id for d in docs] == ["a.jsonl:1", "b/a.txt", "b/deeper/z.txt", "c.TXT"]


def test_glob(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x3.txt").write_text("x3.txt")
    assert texts(tmp_path / "x*.txt") == ["x1.txt", "x2.txt"]
    assert texts(tmp_path / "**" / "x*.txt") == ["x3.txt", "x1.txt", "x2.txt"]  # sorted paths: sub/x3.txt < x1.txt
    with pytest.raises(WiolaError, match="no files match"):
        Corpus(str(tmp_path / "*.jsonl"))
    (tmp_path / "z.csv").write_text("a")
    with pytest.raises(WiolaError, match="unsupported corpus file"):
        Corpus(str(tmp_path / "*.csv"))


def test_missing_and_empty_corpora(tmp_path):
    with pytest.raises(WiolaError, match="corpus not found"):
        Corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WiolaError, match="has no .txt, .jsonl, .parquet files"):
        Corpus(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "void.txt").write_text("")
    with pytest.raises(WiolaError, match="contains no text"):
        list(Corpus(str(tmp_path / "blank.txt")))
    with pytest.raises(WiolaError, match="contains no text"):
        list(Corpus(str(tmp_path / "*.txt")))
    with pytest.raises(WiolaError, match="empty dataset name"):
        Corpus("hf:")


def test_describe_changes_with_the_files(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    before = Corpus(str(path)).describe()
    assert before == Corpus(str(path)).describe()
    path.write_text("two!")
    os.utime(path, ns=(1, 1))
    assert Corpus(str(path)).describe() != before
    assert Corpus("shakespeare").describe()["kind"] == "shakespeare"  # no download needed to describe it


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_saved_dataset_directory(tmp_path, hf_cache):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"text": DOCUMENTS[:4], "label": [0, 1, 2, 3]})
    ds.save_to_disk(tmp_path / "single")
    assert texts(tmp_path / "single") == DOCUMENTS[:4]
    assert texts(tmp_path / "single", streaming=True) == DOCUMENTS[:4]
    DatasetDict({"train": ds, "validation": ds.select([3])}).save_to_disk(tmp_path / "dict")
    assert texts(tmp_path / "dict") == DOCUMENTS[:4]
    assert texts(tmp_path / "dict", split="validation") == [DOCUMENTS[3]]
    with pytest.raises(WiolaError, match="no split 'test'"):
        texts(tmp_path / "dict", split="test")
    with pytest.raises(WiolaError, match="no column 'body'"):
        texts(tmp_path / "single", column="body")
    assert Corpus(str(tmp_path / "single")).describe()["kind"] == "saved-dataset"


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_load_dataset_from_local_files(tmp_path, hf_cache, streaming):
    from datasets import Dataset

    data = tmp_path / "hfdata"
    data.mkdir()
    Dataset.from_dict({"content": DOCUMENTS[:6]}).to_parquet(data / "train.parquet")
    Dataset.from_dict({"content": DOCUMENTS[6:8]}).to_parquet(data / "test.parquet")
    source = f"hf:{data}"
    assert texts(source, column="content", streaming=streaming) == DOCUMENTS[:6]
    assert texts(source, column="content", split="test", streaming=streaming) == DOCUMENTS[6:8]
    with pytest.raises(WiolaError, match="could not load Hugging Face dataset"):
        texts(source, column="content", split="nope", streaming=streaming)
    described = Corpus(source).describe()
    assert described["kind"] == "hf" and len(described["files"]) == 2


def test_hf_packaged_builder_with_config(tmp_path, hf_cache, monkeypatch):
    """`hf:NAME:CONFIG` passes the config to load_dataset (here the packaged json builder)."""
    import datasets

    calls = []
    real = datasets.load_dataset

    def spy(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return real("json", data_files=str(tmp_path / "d.jsonl"), **kwargs)

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert texts("hf:some/dataset:some-config", split="train") == ["hello"]
    assert calls == [("some/dataset", "some-config", {"split": "train", "streaming": False})]
