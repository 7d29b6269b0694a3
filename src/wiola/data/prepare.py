"""`wiola prepare`: a corpus to token shards (`train.bin`, `val.bin`, `manifest.json`, `tokenizer/`).

Layout (docs/layout.md): each split is a flat array of token ids (`uint16` when the
vocabulary has at most 65536 tokens, else `uint32`) in corpus order, every document
followed by the eos id, readable with `numpy.memmap`.

Train/validation split, by document: each document's text is hashed (blake2b keyed with
the seed) to a score in [0, 1). Documents are ranked by score and the lowest-ranked ones
whose total size is closest to `val_fraction` of the corpus characters form `val` (at
least one document, never all). The split therefore depends only on the documents'
contents and the seed, not on their order or the worker count, and identical documents
(equal scores) always land in the same split. A corpus of a single document is split
inside it: the first line break at or after the (1 - val_fraction) point of its
characters ends `train`; the rest is `val`.

The corpus is read in three passes: plan the split (hashing only), train a tokenizer on the
train documents (when none is given), then tokenise (in worker processes when
`num_workers > 1`); a single-document corpus takes one more pass to find its cut. Every pass
streams the corpus in pieces of at most `PIECE_CHARS` characters (`Corpus.pieces`), so memory
stays bounded for any file size, a one-line file included (docs/guarantees.md has figures). A fingerprint of the inputs (sources' paths, sizes and mtimes,
tokenizer hash or training options, split options) lets a repeated run with unchanged
inputs stop at once ("up to date") when the split files still have their recorded sizes and
the tokenizer its recorded hash. Everything is written into a temporary directory inside
`out` and renamed into place, the manifest last; `out` is locked meanwhile (a second prepare,
or a training reading it, makes this one fail at once), SIGTERM removes the temporary
directory like SIGINT does, and one left by a killed run is removed by the next run. The
manifest records each split's sha256 (computed while writing; `manifest.verify(deep=True)`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import threading
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

import numpy as np
from tqdm.auto import tqdm

from wiola.data.corpus import Corpus
from wiola.data.encode import encode_batches
from wiola.data.lock import claim_dir, shared_lock
from wiola.data.manifest import FORMAT, MANIFEST, VERSION, fingerprint, is_complete, read_manifest, token_dtype, write_json_atomic
from wiola.data.tokenizer import HF_PREFIX, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer
from wiola.errors import WiolaError

SPLITS = ("train", "val")
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 256
_PARALLEL_CHARS = 16_000_000
PIECE_CHARS = 1 << 20  # longest text encoded at once


def document_score(text: str, seed: int) -> float:
    """A number in [0, 1) determined by the text and the seed."""
    key = str(seed).encode()
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") / 2**64


def single_document_cut(text: str, val_fraction: float, split_at: str = "line") -> int:
    """Where `val` starts in a lone document: with `split_at="line"`, after the first line break at
    or past the (1 - val_fraction) point (else after the last one before it, else at that point);
    with `split_at="exact"`, at character `int(n * (1 - val_fraction))` (nanoGPT's split)."""
    n = len(text)
    if n < 2:
        raise WiolaError("the corpus is a single document of under 2 characters; it cannot be split (use --val-fraction 0)")
    if split_at == "exact":
        return min(n - 1, max(1, int(n * (1 - val_fraction))))
    target = min(n - 1, max(1, round(n * (1 - val_fraction))))
    newline = text.find("\n", target - 1)
    if newline != -1 and newline + 1 < n:
        return newline + 1
    newline = text.rfind("\n", 0, target - 1)
    return newline + 1 if newline != -1 else target


@dataclass
class SplitPlan:
    """Per-document scores and split assignment, from a first pass over the corpus."""

    scores: np.ndarray
    is_val: np.ndarray
    cut: int | None  # single-document corpus: character index where `val` starts
    replaced_bytes: int
    num_chars: int

    @property
    def method(self) -> str:
        return "single-document" if self.cut is not None else "document-hash"


def choose_val(scores: np.ndarray, sizes: np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean mask of the validation documents (see the module docstring); needs 2+ documents."""
    order = np.argsort(scores, kind="stable")
    cumulative = np.cumsum(sizes[order])
    target = val_fraction * cumulative[-1]
    k = int(np.searchsorted(cumulative, target, side="left")) + 1  # fewest documents reaching the target
    if k > 1 and target - cumulative[k - 2] <= cumulative[k - 1] - target:
        k -= 1
    k = min(max(k, 1), len(scores) - 1)
    is_val = scores <= scores[order[k - 1]]
    if is_val.all():  # every document has the same text
        is_val[:] = False
        is_val[order[:k]] = True
    return is_val


class _Score:
    """`document_score` computed piece by piece (blake2b is incremental)."""

    def __init__(self, seed: int):
        self._digest = hashlib.blake2b(digest_size=8, key=str(seed).encode())

    def update(self, text: str) -> None:
        self._digest.update(text.encode("utf-8", "surrogatepass"))

    def value(self) -> float:
        return int.from_bytes(self._digest.digest(), "big") / 2**64


def stream_cut(corpus: Corpus, n: int, val_fraction: float, split_at: str = "line") -> int:
    """`single_document_cut` of a one-document corpus of `n` characters, read piece by piece."""
    if n < 2:
        raise WiolaError("the corpus is a single document of under 2 characters; it cannot be split (use --val-fraction 0)")
    if split_at == "exact":
        return min(n - 1, max(1, int(n * (1 - val_fraction))))
    target = min(n - 1, max(1, round(n * (1 - val_fraction))))
    offset, last_before = 0, -1
    for piece in corpus.pieces(PIECE_CHARS):
        text = piece.text
        start = max(0, target - 1 - offset)
        if start < len(text):
            j = text.find("\n", start)
            if j != -1:
                return offset + j + 1 if offset + j + 1 < n else (last_before + 1 if last_before != -1 else target)
        end = min(len(text), target - 1 - offset)
        if end > 0:
            k = text.rfind("\n", 0, end)
            if k != -1:
                last_before = offset + k
        offset += len(text)
    return last_before + 1 if last_before != -1 else target


def plan_split(corpus: Corpus, val_fraction: float, seed: int, split_at: str = "line") -> SplitPlan:
    """Assign every document of `corpus` to train or val (see the module docstring)."""
    scores: list[float] = []
    sizes: list[int] = []
    score_of, size = _Score(seed), 0
    for piece in corpus.pieces(PIECE_CHARS):
        score_of.update(piece.text)
        size += len(piece.text)
        if piece.last:
            scores.append(score_of.value())
            sizes.append(size)
            score_of, size = _Score(seed), 0
    score = np.asarray(scores, dtype=np.float64)
    is_val = np.zeros(len(score), dtype=bool)
    cut = None
    if val_fraction > 0 and len(score) == 1:
        cut = stream_cut(corpus, sizes[0], val_fraction, split_at)
    elif val_fraction > 0:
        is_val = choose_val(score, np.asarray(sizes, dtype=np.int64), val_fraction)
    return SplitPlan(score, is_val, cut, corpus.replaced_bytes, int(sum(sizes)))


def iter_pieces(corpus: Corpus, plan: SplitPlan, seed: int) -> Iterator[tuple[str, str, bool]]:
    """(split, text, ends a document) for each piece in corpus order, as planned; each document of
    the split (or each side of a single document's cut) ends with a piece marked True."""
    count, offset, score_of = 0, 0, _Score(seed)
    for piece in corpus.pieces(PIECE_CHARS):
        i = piece.doc
        if i >= len(plan.scores):
            raise WiolaError(f"corpus {corpus.source!r} changed while it was being prepared (document {piece.id}); run again")
        score_of.update(piece.text)
        if plan.cut is not None:
            text, lo, hi, cut = piece.text, offset, offset + len(piece.text), plan.cut
            if hi <= cut:
                yield "train", text, hi == cut
            elif lo >= cut:
                yield "val", text, piece.last
            else:
                yield "train", text[: cut - lo], True
                yield "val", text[cut - lo:], piece.last
            offset = hi
        else:
            yield ("val" if plan.is_val[i] else "train"), piece.text, piece.last
        if piece.last:
            if score_of.value() != plan.scores[i]:
                raise WiolaError(f"corpus {corpus.source!r} changed while it was being prepared (document {piece.id}); run again")
            count, score_of = count + 1, _Score(seed)
    if count != len(plan.scores):
        raise WiolaError(f"corpus {corpus.source!r} changed while it was being prepared ({count} documents, planned {len(plan.scores)}); run again")


def _batched(pieces: Iterator[tuple[str, str, bool]]) -> Iterator[tuple[list[tuple[str, bool]], list[str]]]:
    labels: list[tuple[str, bool]] = []
    texts: list[str] = []
    size = 0
    for label, text, end in pieces:
        labels.append((label, end))
        texts.append(text)
        size += len(text)
        if size >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
            yield labels, texts
            labels, texts, size = [], [], 0
    if texts:
        yield labels, texts


def _write_splits(pieces: Iterator[tuple[str, str, bool]], total: int, staging: Path, tokenizer_json: Path, dtype: np.dtype,
                  eos: int, num_workers: int, progress: bool) -> dict[str, dict[str, Any]]:
    """Tokenise the pieces into `staging/{train,val}.bin`; return per-split counts."""
    files: dict[str, BinaryIO] = {name: open(staging / f"{name}.bin", "wb") for name in SPLITS}
    counts = {name: {"file": f"{name}.bin", "num_tokens": 0, "num_documents": 0} for name in SPLITS}
    digests = {name: hashlib.sha256() for name in SPLITS}
    eos_array = np.asarray([eos], dtype=dtype)
    pending_labels: deque[list[tuple[str, bool]]] = deque()

    def texts_only() -> Iterator[list[str]]:
        for labels, texts in _batched(pieces):
            pending_labels.append(labels)
            yield texts

    bar = tqdm(total=total, unit="doc", desc="tokenizing", disable=None if progress else True)
    try:
        for arrays in encode_batches(texts_only(), str(tokenizer_json), dtype, num_workers):
            labels = pending_labels.popleft()
            ended = 0
            for name in SPLITS:
                chosen = [(a, end) for (label, end), a in zip(labels, arrays) if label == name]
                if chosen:
                    joined = np.concatenate([part for a, end in chosen for part in ((a, eos_array) if end else (a,))])
                    joined.tofile(files[name])
                    digests[name].update(joined)
                    counts[name]["num_tokens"] += int(joined.size)
                    counts[name]["num_documents"] += sum(end for _, end in chosen)
                    ended += sum(end for _, end in chosen)
            bar.update(ended)
            bar.set_postfix(tokens=sum(c["num_tokens"] for c in counts.values()), refresh=False)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    for name in SPLITS:
        counts[name]["sha256"] = digests[name].hexdigest()
    return counts


def _commit(staging: Path, out: Path) -> None:
    """Move the finished files from `staging` into `out`: manifest removed first, written last."""
    (out / MANIFEST).unlink(missing_ok=True)
    for name in SPLITS:
        os.replace(staging / f"{name}.bin", out / f"{name}.bin")
    if (out / "tokenizer").exists():
        os.replace(out / "tokenizer", staging / "tokenizer.old")
    os.replace(staging / "tokenizer", out / "tokenizer")
    os.replace(staging / MANIFEST, out / MANIFEST)


@contextlib.contextmanager
def terminate_cleanly():
    """Turn SIGTERM into SystemExit(143) so that `finally` blocks remove temporary files."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_stale(out: Path) -> None:
    """Remove temporary directories left in `out` by a killed prepare (call while holding out's lock)."""
    for stale in out.glob(".prepare-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def default_num_workers(num_chars: int) -> int:
    """Worker processes when none are asked for: none for corpora under 16M characters
    (a few seconds of work in this process), else the usable CPUs, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 8) if cpus > 1 and num_chars >= _PARALLEL_CHARS else 0


def _summary(out: Path, manifest: dict[str, Any], seconds: float, up_to_date: bool) -> dict[str, Any]:
    splits = manifest["splits"]
    return {"out": str(out), "up_to_date": up_to_date, "documents": manifest["documents"],
            "train_documents": splits["train"]["num_documents"], "val_documents": splits["val"]["num_documents"],
            "train_tokens": splits["train"]["num_tokens"], "val_tokens": splits["val"]["num_tokens"],
            "vocab_size": manifest["vocab_size"], "dtype": manifest["dtype"],
            "replaced_bytes": manifest["replaced_bytes"], "seconds": round(seconds, 3)}


def prepare(source: str = "shakespeare", out: str | Path = "data/shakespeare", tokenizer: str | None = None, *,
            tokenizer_kind: Literal["bpe", "char"] = "bpe", vocab_size: int = 8192, val_fraction: float = 0.1,
            seed: int = 1234, num_workers: int | None = None, column: str = "text", split: str = "train",
            streaming: bool = False, doc_separator: str | None = None, force: bool = False,
            progress: bool = True, split_at: Literal["line", "exact"] = "line") -> dict[str, Any]:
    """Prepare token shards; see `prepare_command` for the arguments. Returns a summary dict."""
    if not 0 <= val_fraction < 1:
        raise WiolaError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise WiolaError(f"--seed must be non-negative, got {seed}")
    if split_at not in ("line", "exact"):
        raise WiolaError(f"--split-at must be line or exact, got {split_at!r}")
    out = Path(out).expanduser()
    from wiola.data import chat

    if chat.is_chat_source(source, column):  # a .jsonl of {"messages": [...]}: tokens + assistant-only loss masks
        return chat.prepare_chat(source, out, tokenizer, tokenizer_kind=tokenizer_kind, vocab_size=vocab_size,
                                 val_fraction=val_fraction, seed=seed, force=force, progress=progress)
    corpus = Corpus(source, column=column, split=split, streaming=streaming, doc_separator=doc_separator)
    if tokenizer is None:
        tokenizer_spec: dict[str, Any] = {"train": tokenizer_kind, "vocab_size": vocab_size}
    elif tokenizer.startswith(HF_PREFIX):
        tokenizer_spec = {"name": tokenizer}
    elif Path(tokenizer).expanduser().is_dir():
        tokenizer_spec = {"path": str(Path(tokenizer).expanduser().resolve()), "sha256": tokenizer_hash(Path(tokenizer).expanduser(), follow_links=True)}
    else:
        raise WiolaError(f"tokenizer not found: {tokenizer} is not a directory (Hugging Face Hub tokenizers: hf:NAME)")
    options = {"val_fraction": val_fraction, "seed": seed, "column": column, "split": split,
               "streaming": streaming, "doc_separator": doc_separator}
    if split_at != "line":  # absent when default, so existing manifests stay up to date
        options["split_at"] = split_at
    sources = [{"source": source, **corpus.describe()}]
    fp = fingerprint({"sources": sources, "tokenizer": tokenizer_spec, "options": options})
    # up to date: a reader's check, so a training run reading `out` (shared lock) does not block it; leftovers
    # of a killed prepare are removed under the exclusive lock below
    if not force and not any(out.glob(".prepare-*")):
        lock = shared_lock(out, "wiola prepare") if (out / MANIFEST).is_file() else None
        try:
            done = _up_to_date(out, fp) if lock is not None else None
        finally:
            if lock is not None:
                lock.release()
        if done is not None:
            return done
    with claim_dir(out, "wiola prepare"), terminate_cleanly():
        remove_stale(out)
        return _prepare_locked(corpus, out, tokenizer, tokenizer_spec, tokenizer_kind, vocab_size, val_fraction, seed,
                               num_workers, split_at, force, progress, fp, sources, options)


def _up_to_date(out: Path, fp: str) -> dict[str, Any] | None:
    """The summary of `out` when it already holds complete data with fingerprint `fp`, else None."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        old = read_manifest(out)
    except WiolaError:
        return None
    if old["fingerprint"] != fp or not is_complete(out, old):
        return None
    print(f"{out} is up to date (fingerprint {fp[:12]}); use --force to prepare it again")
    return _summary(out, old, 0.0, up_to_date=True)


def _prepare_locked(corpus: Corpus, out: Path, tokenizer: str | None, tokenizer_spec: dict[str, Any], tokenizer_kind: str,
                    vocab_size: int, val_fraction: float, seed: int, num_workers: int | None, split_at: str, force: bool,
                    progress: bool, fp: str, sources: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    if not force:
        done = _up_to_date(out, fp)
        if done is not None:
            return done

    start = time.perf_counter()
    plan = plan_split(corpus, val_fraction, seed, split_at)
    workers = default_num_workers(plan.num_chars) if num_workers is None else num_workers
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        if tokenizer is None:
            train_texts = (text for name, text, _ in iter_pieces(corpus, plan, seed) if name == "train")
            tok = train_tokenizer(train_texts, kind=tokenizer_kind, vocab_size=vocab_size,
                                  show_progress=progress and sys.stderr.isatty())
        else:
            tok = load_tokenizer(tokenizer)
        save_tokenizer(tok, staging / "tokenizer")
        if tok.eos_token_id is None:
            raise WiolaError(f"tokenizer {tokenizer} has no eos token, which separates documents")
        vocab = len(tok)
        dtype = token_dtype(vocab)
        total = len(plan.scores) + (1 if plan.cut is not None else 0)
        counts = _write_splits(iter_pieces(corpus, plan, seed), total, staging, staging / "tokenizer" / "tokenizer.json",
                               dtype, tok.eos_token_id, workers, progress)
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": vocab,
            "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "splits": counts,
            "tokenizer": {"path": "tokenizer", "sha256": tokenizer_hash(staging / "tokenizer"), "source": tokenizer_spec},
            "sources": sources, "options": options, "split_method": plan.method,
            "documents": len(plan.scores), "replaced_bytes": plan.replaced_bytes, "fingerprint": fp,
        }
        write_json_atomic(staging / MANIFEST, manifest)
        _commit(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _summary(out, manifest, time.perf_counter() - start, up_to_date=False)


def prepare_command(source: str = "shakespeare", out: str = "data/shakespeare", tokenizer: str | None = None,
                    tokenizer_kind: Literal["bpe", "char"] = "bpe", vocab_size: int = 8192, val_fraction: float = 0.1,
                    seed: int = 1234, num_workers: int | None = None, column: str = "text", split: str = "train",
                    streaming: bool = False, doc_separator: str | None = None, force: bool = False,
                    split_at: Literal["line", "exact"] = "line") -> dict[str, Any]:
    """Tokenise a corpus into train/val token shards for training (numpy memmaps + manifest.json).

    Documents go to train or val by a seeded hash of their text (a single-document corpus is
    split at a line break near the end); each document is followed by the eos token. A .jsonl
    of chat conversations ({"messages": [{"role", "content"}, ...]} per line) is rendered with the
    chat template and gets loss masks, so training learns the assistant replies only (docs/finetune.md). Without
    --tokenizer, a tokenizer is trained on the train split and saved in OUT/tokenizer. A run
    whose inputs are unchanged since the last one is skipped.

    Args:
        source: corpus: shakespeare (built-in), a .txt/.jsonl/.parquet file, a directory, a glob, or hf:NAME[:CONFIG].
        out: output directory.
        tokenizer: tokenizer directory (or hf:NAME) to use instead of training one.
        tokenizer_kind: kind of tokenizer to train when none is given: bpe or char.
        vocab_size: vocabulary size of a trained bpe tokenizer.
        val_fraction: share of the corpus characters to put in the validation split, in [0, 1).
        seed: seed of the document hash that decides the split.
        num_workers: tokenizer processes; 0 or 1 = in this process (default: 0 below 16M characters, else CPUs up to 8).
        column: text column of .jsonl/.parquet files and datasets; `messages` (or a .jsonl whose lines have a
            messages list and no text column) reads chat conversations.
        split: split of a Hugging Face dataset.
        streaming: stream a Hugging Face dataset.
        doc_separator: regular expression that splits .txt files into documents (e.g. '\\n\\s*\\n').
        force: prepare again even if the output is up to date.
        split_at: where a single-document corpus is cut: line (the next line break) or exact
            (character int(n·(1 − val_fraction)), as nanoGPT splits tinyshakespeare).
    """
    summary = prepare(source, out, tokenizer, tokenizer_kind=tokenizer_kind, vocab_size=vocab_size,
                      val_fraction=val_fraction, seed=seed, num_workers=num_workers, column=column, split=split,
                      streaming=streaming, doc_separator=doc_separator, force=force, split_at=split_at)
    if not summary["up_to_date"]:
        print(f"prepared {summary['out']} in {summary['seconds']:.1f} s: {summary['documents']} documents "
              f"({summary['train_documents']} train, {summary['val_documents']} val pieces), "
              f"{summary['train_tokens']:,} train + {summary['val_tokens']:,} val tokens, "
              f"vocab {summary['vocab_size']} ({summary['dtype']}), {summary['replaced_bytes']} invalid UTF-8 bytes replaced")
    return summary
