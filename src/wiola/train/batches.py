"""Token batches for training and evaluation, read from a `wiola prepare` directory.

The data directory holds `manifest.json`, `train.bin`, `val.bin` (flat memmaps of token
ids) and `tokenizer/` (docs/layout.md). Training draws windows of `seq_len` tokens at
random offsets; the offsets of global batch k depend only on (seed, k), so the data order
is the same for any number of processes (rank r takes its contiguous share of the global
batch) and resuming needs only k. Evaluation walks the split in consecutive
non-overlapping windows from the start, so every evaluation sees the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from wiola.errors import WiolaError


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        if not Path(data_dir).exists():
            raise FileNotFoundError(f"data directory not found: {data_dir}")
        raise WiolaError(f"{data_dir} is not a prepared dataset (no manifest.json; run `wiola prepare`)")
    manifest = json.loads(path.read_text())
    for key in ("dtype", "vocab_size", "splits"):
        if key not in manifest:
            raise WiolaError(f"{path}: missing {key!r}")
    return manifest


def tokenizer_dir(data_dir: str | Path) -> Path | None:
    path = Path(data_dir) / "tokenizer"
    return path if path.is_dir() else None


def special_token_ids(data_dir: str | Path, manifest: dict[str, Any]) -> dict[str, int | None]:
    """bos/eos/pad ids for the model config: eos from the manifest, the others from the tokenizer."""
    ids: dict[str, int | None] = {"eos_token_id": manifest.get("eos_token_id")}
    tok_dir = tokenizer_dir(data_dir)
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        ids["bos_token_id"] = tok.bos_token_id
        ids["pad_token_id"] = tok.pad_token_id
        if ids["eos_token_id"] is None:
            ids["eos_token_id"] = tok.eos_token_id
    return ids


def open_split(data_dir: str | Path, split: str) -> np.ndarray:
    """The token ids of one split as a read-only memmap."""
    manifest = read_manifest(data_dir)
    info = manifest["splits"].get(split)
    if info is None:
        raise WiolaError(f"{data_dir}: no split {split!r} (have {', '.join(manifest['splits'])})")
    path = Path(data_dir) / info.get("file", f"{split}.bin")
    if not path.is_file():
        raise WiolaError(f"{data_dir}: split {split!r} file {path.name} is missing")
    tokens = np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r")
    expected = info.get("num_tokens")
    if expected is not None and expected != len(tokens):
        raise WiolaError(f"{path}: holds {len(tokens)} tokens, manifest says {expected}")
    return tokens


class TrainBatches:
    """This rank's share of each global training batch, as int64 tensors [batch_size/world_size, seq_len]."""

    def __init__(self, data_dir: str | Path, *, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1, split: str = "train"):
        if batch_size % world_size:
            raise WiolaError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.tokens = open_split(data_dir, split)
        if len(self.tokens) < seq_len + 1:
            raise WiolaError(f"the {split} split has {len(self.tokens)} tokens, fewer than one sequence of {seq_len}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        per_rank = batch_size // world_size
        self.lo, self.hi = rank * per_rank, (rank + 1) * per_rank
        self.index = 0  # global batches drawn so far

    def offsets(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, len(self.tokens) - self.seq_len + 1, size=self.batch_size)

    def next(self) -> torch.Tensor:
        starts = self.offsets(self.index)[self.lo : self.hi]
        self.index += 1
        rows = [np.asarray(self.tokens[s : s + self.seq_len], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "batch_size", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise WiolaError(f"data position was saved with {key}={state[key]}, now {getattr(self, key)}")
        self.index = int(state["index"])


def eval_batches(data_dir: str | Path, split: str, *, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows of `seq_len` tokens from the start of `split`, `batch_size` per batch."""
    tokens = open_split(data_dir, split)
    windows = len(tokens) // seq_len
    if windows == 0:
        raise WiolaError(f"the {split} split has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
    total = windows if max_batches is None else min(windows, max_batches * batch_size)
    for first in range(0, total, batch_size):
        count = min(batch_size, total - first)
        chunk = np.asarray(tokens[first * seq_len : (first + count) * seq_len], dtype=np.int64)
        yield torch.from_numpy(chunk.reshape(count, seq_len))
