"""Batches for training and evaluation from a directory written by `wiola prepare`.

- `TokenDataset(path, split)` memory-maps one split.
- `RandomBatchSampler` yields training batches `(input_ids, labels)` of shape `[B, T]`: each
  row is a window of `T + 1` tokens at a random offset, `input_ids = w[:-1]`,
  `labels = w[1:]`. The offsets of global batch number `step` come from
  `numpy.random.default_rng([seed, step])`, so the state is just `(seed, step)`
  (`state_dict()` / `load_state_dict()`). With `world_size > 1` every rank draws the same
  global batch and keeps its contiguous slice of rows, so the union over ranks equals the
  single-process batch, and a run can resume on a different number of ranks.
- `TokenDataset.iter_eval_batches(B, T)` walks a split sequentially in non-overlapping
  windows (window `j` starts at token `j * T`), for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from wiola.data.manifest import read_manifest, split_file
from wiola.errors import WiolaError

Batch = tuple[torch.Tensor, torch.Tensor]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise WiolaError(f"invalid rank {rank} for world size {world_size}")


def _to_batch(windows: np.ndarray) -> Batch:
    """[B, T+1] windows -> (inputs [B, T], labels [B, T]) as int64 tensors."""
    w = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    return w[:, :-1], w[:, 1:]


class TokenDataset:
    """One split of a prepared token directory, memory-mapped (read-only).

    Args:
        path: directory written by `wiola prepare`.
        split: `train` or `val`.
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        if split not in self.manifest["splits"]:
            raise WiolaError(f"{path} has no split {split!r} (splits: {sorted(self.manifest['splits'])})")
        self.split = split
        info = self.manifest["splits"][split]
        dtype = np.dtype(self.manifest["dtype"])
        file = split_file(self.path, self.manifest, split)
        if not file.is_file() or file.stat().st_size != info["num_tokens"] * dtype.itemsize:
            raise WiolaError(f"{file} is missing or does not have the {info['num_tokens']} tokens the manifest records; run `wiola prepare` again")
        self.tokens: np.ndarray = (np.memmap(file, dtype=dtype, mode="r", shape=(info["num_tokens"],))
                                   if info["num_tokens"] else np.zeros(0, dtype=dtype))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.manifest["eos_token_id"])

    def __len__(self) -> int:
        return len(self.tokens)

    def _require(self, seq_len: int) -> None:
        if seq_len < 1:
            raise WiolaError(f"sequence length must be positive, got {seq_len}")
        if len(self) < seq_len + 1:
            raise WiolaError(f"the {self.split} split of {self.path} has {len(self)} tokens; "
                             f"sequence length {seq_len} needs at least {seq_len + 1}")

    def windows(self, offsets: np.ndarray, seq_len: int) -> np.ndarray:
        """Rows `tokens[o : o + seq_len + 1]` for each offset, as a [len(offsets), seq_len + 1] array."""
        return self.tokens[np.asarray(offsets)[:, None] + np.arange(seq_len + 1)]

    def num_eval_windows(self, seq_len: int) -> int:
        """How many non-overlapping windows `iter_eval_batches` visits (the tail is dropped)."""
        return (len(self) - 1) // seq_len if len(self) > 0 else 0

    def iter_eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                          rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Sequential non-overlapping `(input_ids, labels)` batches over the whole split.

        Global batch `g` holds windows `g*B ... g*B + B - 1` (the last one may be smaller);
        with `world_size > 1` each rank gets a contiguous part of its rows
        (`numpy.array_split`), so every rank sees the same number of batches, possibly
        with 0 rows in the last one. `max_batches` limits the number of global batches.
        """
        self._require(seq_len)
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise WiolaError(f"batch size must be positive, got {batch_size}")
        starts = np.arange(self.num_eval_windows(seq_len)) * seq_len
        for g, first in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and g >= max_batches:
                return
            mine = np.array_split(starts[first:first + batch_size], world_size)[rank]
            yield _to_batch(self.windows(mine, seq_len) if len(mine) else np.zeros((0, seq_len + 1), dtype=np.int64))


class RandomBatchSampler:
    """Endless training batches at random offsets, reproducible from `(seed, step)`.

    Args:
        dataset: the split to sample from.
        batch_size: global batch size (summed over ranks); divisible by `world_size`.
        seq_len: tokens per row `T`.
        seed: non-negative seed.
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        dataset._require(seq_len)
        _check_rank(rank, world_size)
        if batch_size < 1 or batch_size % world_size:
            raise WiolaError(f"global batch size {batch_size} must be a positive multiple of the world size {world_size}")
        if seed < 0:
            raise WiolaError(f"seed must be non-negative, got {seed}")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def global_offsets(self, step: int) -> np.ndarray:
        """Start offsets of the `batch_size` rows of global batch `step`."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.dataset) - self.seq_len, size=self.batch_size)

    def __iter__(self) -> "RandomBatchSampler":
        return self

    def __next__(self) -> Batch:
        offsets = self.global_offsets(self.step)
        lo = self.rank * self.local_batch_size
        self.step += 1
        return _to_batch(self.dataset.windows(offsets[lo:lo + self.local_batch_size], self.seq_len))

    def state_dict(self) -> dict[str, int]:
        """The sampler's position: restore it with `load_state_dict` to continue identically."""
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["batch_size"], state["seq_len"]) != (self.batch_size, self.seq_len):
            raise WiolaError(f"sampler state is for batch size {state['batch_size']} and sequence length {state['seq_len']}, "
                             f"not {self.batch_size} and {self.seq_len}")
        self.seed, self.step = int(state["seed"]), int(state["step"])
