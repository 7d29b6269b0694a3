"""Glue between a `wiola prepare` directory (`wiola.data.loader`) and the training/eval loops.

Batches are `(input_ids, labels)` pairs of shape [B, T] with `labels` already shifted
(each row is a window of T + 1 tokens). `causal_lm_loss` scores a model's logits against
them; the loops use it rather than the model's own `labels=` loss, which shifts again and
would predict only T - 1 tokens per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from wiola.data import chat
from wiola.data.loader import RandomBatchSampler, TokenDataset
from wiola.data.manifest import read_manifest as _read_manifest
from wiola.data.manifest import tokenizer_dir as _tokenizer_dir

Batch = tuple[torch.Tensor, torch.Tensor]


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    if not Path(data_dir).exists():
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    return _read_manifest(data_dir)


def tokenizer_dir(data_dir: str | Path) -> Path | None:
    """The tokenizer saved with the data (`tokenizer/` unless the manifest names another folder)."""
    path = _tokenizer_dir(data_dir, read_manifest(data_dir))  # refuses a path outside data_dir
    return path if path.is_dir() else None


def special_token_ids(data_dir: str | Path, manifest: dict[str, Any]) -> dict[str, int | None]:
    """bos/eos/pad ids for the model config, from the manifest (or the tokenizer for older manifests)."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    if all(k in manifest for k in keys):
        return {k: manifest[k] for k in keys}
    ids: dict[str, int | None] = {k: manifest.get(k) for k in keys}
    tok_dir = tokenizer_dir(data_dir)
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        for key in keys:
            if key not in manifest:
                ids[key] = getattr(tok, key)
    return ids


def train_sampler(data_dir: str | Path, *, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int) -> RandomBatchSampler:
    """This rank's share of each global training batch; resumable through state_dict()."""
    dataset = TokenDataset(data_dir, "train")
    sampler = RandomBatchSampler(dataset, batch_size, seq_len, seed=seed, rank=rank, world_size=world_size)
    mask = chat.loss_mask(dataset)  # chat data: labels outside assistant replies become -100
    return sampler if mask is None else chat.MaskedSampler(sampler, mask)


def eval_batches(data_dir: str | Path, split: str, *, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[Batch]:
    """Consecutive non-overlapping windows from the start of `split` (the same on every call)."""
    dataset = TokenDataset(data_dir, split)
    mask = chat.loss_mask(dataset)
    if mask is not None:
        return chat.masked_eval_batches(dataset, mask, batch_size, seq_len, max_batches=max_batches)
    return dataset.iter_eval_batches(batch_size, seq_len, max_batches=max_batches)


def document_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Position ids that restart at 0 after every eos token: each document of a packed training window
    then attends only to itself, and the model's running means restart with it (`--document-mask`).
    The eos closing a document belongs to that document; the token after it starts the next."""
    from wiola.components_wiola import segment_first

    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_token_id
    return torch.arange(ids.shape[1], device=ids.device)[None, :] - segment_first(starts)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 of logits [B, T, V] against shifted labels [B, T].

    Labels of -100 (outside the loss mask of chat data) are skipped; a batch without any label gives 0.
    The model's own loss with the labels already aligned (`shift_labels`), normalised by their count."""
    from wiola.modeling_wiola import causal_lm_loss as model_loss

    return model_loss(logits, shift_labels=labels, num_items_in_batch=(labels != -100).sum().clamp(min=1))
