"""Tiny saved models for the server tests: a byte-level BPE of 300 tokens (with the default chat
template) and a randomised tiny model of each family in `tests.train.tinyrun.FAMILIES`."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.train.tinyrun import FAMILIES, TINY_MODEL, corpus

CONTEXT = 128


def tiny_tokenizer():
    from wiola.data.tokenizer import train_tokenizer

    return train_tokenizer(corpus(200, 0), "bpe", vocab_size=300)


def save_tiny_model(out: Path, family: str, tokenizer, seed: int = 0, context: int = CONTEXT) -> Path:
    """A randomised tiny model of `family` with `tokenizer`, saved to `out` (a `save_pretrained` directory)."""
    from wiola import WiolaConfig, WiolaForCausalLM

    fields = {**TINY_MODEL, **FAMILIES[family], "max_position_embeddings": context, "vocab_size": len(tokenizer),
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    model = WiolaForCausalLM(WiolaConfig(**fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every weight off its init so that each component shapes the tokens
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
