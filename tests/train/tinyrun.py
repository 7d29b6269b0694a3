"""Tiny prepared datasets and model configs for the training, eval and generate tests.

`make_dataset(dir)` writes the `wiola prepare` layout of docs/layout.md by hand: a byte-level
BPE tokenizer trained on a small synthetic corpus, `train.bin`/`val.bin` (uint16 ids, documents
separated by EOS) and `manifest.json`. `write_model_config` writes a tiny model config JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
SUBJECTS = ["the king", "a fool", "my lord", "the queen", "sweet Romeo", "good Horatio", "the ghost"]
VERBS = ["speaks to", "follows", "betrays", "loves", "fears", "greets", "mocks"]
OBJECTS = ["the crown", "his brother", "the night", "a letter", "the sea", "her father", "the stars"]


def corpus(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(lines).capitalize() + " Ünïcödé ☺")
    return docs


def make_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
    fast.save_pretrained(out)
    return fast


def make_dataset(root: Path, n_train: int = 400, n_val: int = 40) -> Path:
    """Write a prepared dataset to `root` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = corpus(n_train, 0), corpus(n_val, 1)
    tok = make_tokenizer(train_docs, root / "tokenizer")
    eos = tok.convert_tokens_to_ids(EOS)
    splits = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        ids: list[int] = []
        for doc in docs:
            ids.extend(tok(doc, add_special_tokens=False).input_ids)
            ids.append(eos)
        np.asarray(ids, dtype=np.uint16).tofile(root / f"{name}.bin")
        splits[name] = {"file": f"{name}.bin", "num_tokens": len(ids), "num_documents": len(docs)}
    manifest = {"dtype": "uint16", "vocab_size": len(tok), "eos_token_id": eos, "splits": splits,
                "tokenizer": "tokenizer", "sources": ["synthetic"], "fingerprint": "test"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64}


def write_model_config(path: Path, **fields) -> Path:
    path.write_text(json.dumps({**TINY_MODEL, **fields}))
    return path


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


# options shared by most runs: tiny and fast on two CPU cores
FAST = ["--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--eval-batches", "2",
        "--log-every", "1", "--device", "cpu", "--no-tensorboard"]
