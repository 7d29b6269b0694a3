"""Tokenisation of batches of documents into numpy arrays, in this process or in workers.

Each document is encoded on its own with the fast tokenizer's backend (no special tokens
added; text that looks like a special token, e.g. a literal `<|eos|>`, is encoded as plain
text), so the result does not depend on how documents are batched or on the worker count.
Workers are processes that load `tokenizer.json` once; at most two batches per worker are
in flight, so memory stays bounded for corpora of any size, and results come back in
input order. On Linux they are forked (starting in milliseconds; a spawned worker would
first re-import torch and transformers through `import wiola`); elsewhere they are spawned.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_worker: tuple["Tokenizer", np.dtype] | None = None


def load_backend(tokenizer_json: str) -> "Tokenizer":
    """Load `tokenizer.json` for encoding corpus text (special-token text is not special)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_json)
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode_texts(tokenizer: "Tokenizer", texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of each text, as arrays of `dtype`."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast skips offsets
    return [np.asarray(e.ids, dtype=dtype) for e in encode(texts, add_special_tokens=False)]


def _init_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker
    # Ctrl-C reaches the whole process group: the parent stops the pool; a worker must not print a traceback.
    # SIGTERM (what Pool.terminate sends) must end a worker at once, whatever handler the parent installed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _worker = (load_backend(tokenizer_json), np.dtype(dtype))


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _worker is not None
    return encode_texts(_worker[0], texts, _worker[1])


def encode_batches(batches: Iterable[list[str]], tokenizer_json: str, dtype: np.dtype,
                   num_workers: int = 0) -> Iterator[list[np.ndarray]]:
    """Encode each batch of texts; yields the arrays of each batch in input order.

    `num_workers <= 1` encodes in this process (the tokenizer may still use its own threads);
    otherwise `num_workers` worker processes share the batches.
    """
    if num_workers <= 1:
        tokenizer = load_backend(tokenizer_json)
        for texts in batches:
            yield encode_texts(tokenizer, texts, dtype)
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by forked workers: no thread pools there
    # Workers are forked with the default SIGTERM action: a Python-level handler of the parent (prepare's
    # clean-up on SIGTERM) would never run in a worker stuck in C code, and Pool.terminate() would then hang.
    main_thread = threading.current_thread() is threading.main_thread()
    term = signal.signal(signal.SIGTERM, signal.SIG_DFL) if main_thread else None
    try:
        pool = multiprocessing.get_context(method).Pool(num_workers, initializer=_init_worker,
                                                        initargs=(tokenizer_json, np.dtype(dtype).str))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, term)
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.apply_async(_encode_in_worker, (texts,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
