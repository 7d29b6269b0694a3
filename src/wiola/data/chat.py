"""Chat data: the default chat template, and `wiola prepare` of `.jsonl` conversations with loss masks.

Chat template (`CHAT_TEMPLATE`, saved as `chat_template.jinja` with every tokenizer that `wiola
tokenizer` or `wiola prepare` trains, so `tokenizer.apply_chat_template` works):

    <|bos|><|system|>\\n{system}<|eos|><|user|>\\n{question}<|eos|><|assistant|>\\n{answer}<|eos|>...

Each message is `<|ROLE|>` and a line break, its content, and the tokenizer's eos token; the
conversation starts with the bos token (when the tokenizer has one). `add_generation_prompt=True`
ends the text with `<|assistant|>\\n`, and a model trained on this format ends its reply with eos,
where decoding stops. The role markers are plain text (the byte-level BPE spells them with a few
tokens), so no token is added to the vocabulary. Assistant content and its eos are wrapped in
`{% generation %}` so `return_assistant_tokens_mask=True` (and TRL's `assistant_only_loss`) find them.

Chat data: a `.jsonl` file whose lines are `{"messages": [{"role": ..., "content": ...}, ...]}`.
`prepare_chat` renders each conversation with the tokenizer's chat template and writes, beside
each split's token shard `SPLIT.bin`, a loss mask `SPLIT.mask.bin` (`uint8`, one byte per token: 1
where the token belongs to an assistant reply, its closing eos included). The manifest names it
as `splits.SPLIT.loss_mask`. Training and evaluation (`MaskedSampler`, `masked_eval_batches`) turn
the labels of every other token into -100, so the loss covers assistant tokens only. Conversations
follow each other in the shard like documents; a training window may span two of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from wiola.errors import WiolaError

CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MASK_SUFFIX = ".mask.bin"


def ensure_chat_template(tokenizer) -> bool:
    """Give `tokenizer` the default chat template unless it has one; True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = CHAT_TEMPLATE
    return True


# ---------------------------------------------------------------------- reading


def is_chat_source(source: str, column: str) -> bool:
    """True for a `.jsonl` file whose first record has a `messages` list (and no `column` text), or column=messages."""
    path = Path(source).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        return False
    if column == "messages":
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and isinstance(record.get("messages"), list) and column not in record
    return False


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """The conversations of a chat `.jsonl`, checked: each a list of {role, content} strings with an assistant turn."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WiolaError(f"{where}: not valid JSON ({exc.msg})") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise WiolaError(f"{where}: expected an object with a non-empty \"messages\" list")
            for message in messages:
                if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
                    raise WiolaError(f"{where}: every message needs string \"role\" and \"content\", got {json.dumps(message)[:80]}")
            if not any(m["role"] == "assistant" for m in messages):
                raise WiolaError(f"{where}: the conversation has no assistant message, so nothing to learn")
            conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise WiolaError(f"{path}: no conversations")
    return conversations


def encode_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of one conversation rendered with the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if not any(mask):
        raise WiolaError("the tokenizer's chat template marks no assistant tokens: it needs {% generation %} ... "
                         "{% endgeneration %} around assistant replies (the default template of wiola has them)")
    return ids, mask


# ---------------------------------------------------------------------- prepare


def prepare_chat(source: str, out: Path, tokenizer: str | None, *, tokenizer_kind: str, vocab_size: int,
                 val_fraction: float, seed: int, force: bool, progress: bool) -> dict[str, Any]:
    """`wiola prepare` for a chat `.jsonl`: token shards, loss-mask shards, tokenizer (with chat template), manifest."""
    from wiola.data.manifest import FORMAT, MANIFEST, VERSION, fingerprint, is_complete, read_manifest, token_dtype, write_json_atomic
    from wiola.data.prepare import SPLITS, _summary, choose_val, document_score
    from wiola.data.tokenizer import HF_PREFIX, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer

    path = Path(source).expanduser()
    st = path.stat()
    if tokenizer is None:
        tokenizer_spec: dict[str, Any] = {"train": tokenizer_kind, "vocab_size": vocab_size}
    elif tokenizer.startswith(HF_PREFIX):
        tokenizer_spec = {"name": tokenizer}
    elif Path(tokenizer).expanduser().is_dir():
        tokenizer_spec = {"path": str(Path(tokenizer).expanduser().resolve()), "sha256": tokenizer_hash(Path(tokenizer).expanduser())}
    else:
        raise WiolaError(f"tokenizer not found: {tokenizer} is not a directory (Hugging Face Hub tokenizers: hf:NAME)")
    options = {"val_fraction": val_fraction, "seed": seed, "chat": True,
               "template_sha256": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()}
    sources = [{"source": source, "kind": "chat-jsonl", "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}]
    fp = fingerprint({"sources": sources, "tokenizer": tokenizer_spec, "options": options})
    if not force and (out / MANIFEST).is_file():
        try:
            old = read_manifest(out)
        except WiolaError:
            old = None
        if (old is not None and old["fingerprint"] == fp and is_complete(out, old)
                and all((out / info["loss_mask"]).is_file() for info in old["splits"].values())):
            print(f"{out} is up to date (fingerprint {fp[:12]}); use --force to prepare it again")
            return _summary(out, old, 0.0, up_to_date=True)

    start = time.perf_counter()
    conversations = read_conversations(path)
    keys = [json.dumps(c, sort_keys=True, ensure_ascii=False) for c in conversations]
    is_val = np.zeros(len(conversations), dtype=bool)
    if val_fraction > 0:
        if len(conversations) < 2:
            raise WiolaError(f"{path} has a single conversation; it cannot be split (use --val-fraction 0)")
        scores = np.asarray([document_score(k, seed) for k in keys])
        is_val = choose_val(scores, np.asarray([len(k) for k in keys], dtype=np.int64), val_fraction)
    if tokenizer is None:
        texts = (f"<|{m['role']}|>\n{m['content']}" for c, v in zip(conversations, is_val) if not v for m in c)
        tok = train_tokenizer(texts, kind=tokenizer_kind, vocab_size=vocab_size, show_progress=progress and sys.stderr.isatty())
    else:
        tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise WiolaError(f"tokenizer {tokenizer} has no eos token, which ends every message")
    if ensure_chat_template(tok):
        print("note: the tokenizer had no chat template; the default one of wiola (docs/finetune.md) is saved with it", file=sys.stderr)
    dtype = token_dtype(len(tok))

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        save_tokenizer(tok, staging / "tokenizer")
        counts = {}
        for name in SPLITS:
            ids_parts, mask_parts = [], []
            for conversation, v in zip(conversations, is_val):
                if bool(v) == (name == "val"):
                    ids, mask = encode_conversation(tok, conversation)
                    ids_parts.append(np.asarray(ids, dtype=dtype))
                    mask_parts.append(np.asarray(mask, dtype=np.uint8))
            tokens = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=dtype)
            masks = np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=np.uint8)
            tokens.tofile(staging / f"{name}.bin")
            masks.tofile(staging / f"{name}{MASK_SUFFIX}")
            counts[name] = {"file": f"{name}.bin", "num_tokens": int(tokens.size), "num_documents": len(ids_parts),
                            "loss_mask": f"{name}{MASK_SUFFIX}", "num_loss_tokens": int(masks.sum())}
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "splits": counts,
            "tokenizer": {"path": "tokenizer", "sha256": tokenizer_hash(staging / "tokenizer"), "source": tokenizer_spec},
            "sources": sources, "options": options, "split_method": "document-hash" if val_fraction > 0 else "none",
            "documents": len(conversations), "replaced_bytes": 0, "fingerprint": fp,
        }
        write_json_atomic(staging / MANIFEST, manifest)
        (out / MANIFEST).unlink(missing_ok=True)  # as `wiola prepare`: the manifest goes first and comes back last
        for name in SPLITS:
            os.replace(staging / f"{name}.bin", out / f"{name}.bin")
            os.replace(staging / f"{name}{MASK_SUFFIX}", out / f"{name}{MASK_SUFFIX}")
        if (out / "tokenizer").exists():
            os.replace(out / "tokenizer", staging / "tokenizer.old")
        os.replace(staging / "tokenizer", out / "tokenizer")
        os.replace(staging / MANIFEST, out / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = _summary(out, manifest, time.perf_counter() - start, up_to_date=False)
    summary["loss_tokens"] = {name: counts[name]["num_loss_tokens"] for name in SPLITS}
    return summary


# ---------------------------------------------------------------------- batches with masked labels


def loss_mask(dataset) -> np.ndarray | None:
    """The loss-mask memmap of a `TokenDataset`'s split, or None when the data has none (plain text)."""
    info = dataset.manifest["splits"][dataset.split]
    name = info.get("loss_mask")
    if not name:
        return None
    file = dataset.path / name
    if not file.is_file() or file.stat().st_size != info["num_tokens"]:
        raise WiolaError(f"{file} is missing or does not have the {info['num_tokens']} bytes the manifest records; run `wiola prepare` again")
    return np.memmap(file, dtype=np.uint8, mode="r", shape=(info["num_tokens"],)) if info["num_tokens"] else np.zeros(0, np.uint8)


def _mask_labels(labels: torch.Tensor, mask: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """Labels with -100 where the loss mask of the label's token is 0 (labels[t] is token start + t + 1)."""
    keep = mask[np.asarray(starts)[:, None] + np.arange(1, seq_len + 1)] if len(starts) else np.zeros((0, seq_len), np.uint8)
    return labels.masked_fill(torch.from_numpy(np.ascontiguousarray(keep)) == 0, -100)


class MaskedSampler:
    """A `RandomBatchSampler` whose labels are -100 outside the loss mask; same state_dict, same batches otherwise."""

    def __init__(self, sampler, mask: np.ndarray):
        self.sampler, self.mask = sampler, mask

    def __iter__(self) -> "MaskedSampler":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sampler
        lo = s.rank * s.local_batch_size
        starts = s.global_offsets(s.step)[lo:lo + s.local_batch_size]
        inputs, labels = next(s)
        return inputs, _mask_labels(labels, self.mask, starts, s.seq_len)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)


def masked_eval_batches(dataset, mask: np.ndarray, batch_size: int, seq_len: int,
                        max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`dataset.iter_eval_batches` (one process) with labels masked like `MaskedSampler`'s."""
    starts = np.arange(dataset.num_eval_windows(seq_len)) * seq_len
    for g, (inputs, labels) in enumerate(dataset.iter_eval_batches(batch_size, seq_len, max_batches=max_batches)):
        yield inputs, _mask_labels(labels, mask, starts[g * batch_size:(g + 1) * batch_size], seq_len)
