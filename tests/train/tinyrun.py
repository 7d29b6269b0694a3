"""Tiny prepared datasets and model configs for the training, eval and generate tests.

`make_dataset(dir)` runs `wiola prepare` on a small synthetic corpus (a byte-level BPE of 320
tokens is trained on it); `write_model_config` writes a tiny model config JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


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


def make_dataset(root: Path, n_docs: int = 440) -> Path:
    """Prepare a synthetic corpus with `wiola prepare` (byte-level BPE, vocab 320) into `root`."""
    from wiola.data.prepare import prepare

    root.mkdir(parents=True, exist_ok=True)
    source = root.parent / f"{root.name}-corpus.jsonl"
    source.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in corpus(n_docs, 0)), encoding="utf-8")
    prepare(str(source), root, tokenizer_kind="bpe", vocab_size=320, val_fraction=0.1, num_workers=1, progress=False)
    return root


TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64}


# the model families every journey runs: seed-style, paper-style with ATM forced on (threshold -1
# merges every eligible pair; 3 layers, so that layer 1 merges and GCLA reads layers 0-1), all-off, and article-style
FAMILIES = {
    "seed": dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly"),
    "paper": dict(position_encoding="srpe", cross_layer_context="gcla", token_merging="atm", atm_threshold=-1.0,
                  mlp="dsff", dsff_wide_size=64, norm="wiola_rmsnorm", num_hidden_layers=3),
    "all-off": {},
    # the news article's components (docs/architecture.md §6): F3N with the AGU gate (levels drawn per step and layer, an L1
    # penalty) and HLN, on the paper's attention (ATM forced on)
    "article": dict(position_encoding="srpe", cross_layer_context="gcla", token_merging="atm", atm_threshold=-1.0,
                    mlp="f3n", f3n_gate="agu", f3n_levels=3, f3n_sampling="layer", agu_l1=0.001, norm="hln", num_hidden_layers=3),
}


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
