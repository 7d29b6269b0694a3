"""Tiny saved models (with a character tokenizer) for the export tests, one per family of `tests/train/tinyrun.py`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.train.tinyrun import FAMILIES, TINY_MODEL, corpus

VOCAB = 64  # the character tokenizer has ~40 entries; the rest are unused rows (as in a padded vocabulary)
CONTEXT = 96  # room for a prompt and 64 new tokens


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory):
    from wiola.data.tokenizer import save_tokenizer, train_tokenizer

    return save_tokenizer(train_tokenizer(corpus(40, 0), kind="char"), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def exports(tmp_path_factory, char_tokenizer):
    """`exports(family)`: (saved model folder, its `wiola export --to onnx` folder), one per family, made on first use
    and shared by the export and ONNX-engine tests."""
    from wiola.export import export_model

    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"onnx-{family}")
            src = save_model(root / "model", char_tokenizer, family)
            saved = os.environ.get("WIOLA_ONNX_ONE_TOKEN_BODY")
            os.environ["WIOLA_ONNX_ONE_TOKEN_BODY"] = "1"  # what users get: both bodies (tests/conftest.py turns it off)
            try:
                export_model(src, root / "onnx", "onnx", quiet=True, engine_cache=False)  # tests place it in the cache themselves
            finally:
                os.environ["WIOLA_ONNX_ONE_TOKEN_BODY"] = saved if saved is not None else "0"
            made[family] = src, root / "onnx"
        return made[family]

    return get


def save_model(folder: Path, tokenizer_dir: Path, family: str = "all-off", seed: int = 0, **overrides) -> Path:
    """A randomly initialised model of `family` (weights scaled up so that its greedy choices are clear-cut)
    saved with the tokenizer into `folder`."""
    import shutil

    from wiola import WiolaConfig, WiolaForCausalLM

    fields = {**TINY_MODEL, **FAMILIES[family], "vocab_size": VOCAB, "max_position_embeddings": CONTEXT,
              "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, **overrides}
    torch.manual_seed(seed)
    model = WiolaForCausalLM(WiolaConfig(**fields)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("blend_logit", "offset")) or "norm" in name:
                continue
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1, generator=g)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, folder / f.name)
    return folder
