"""End to end through the command line: `wiola tokenizer`, `wiola prepare`, then the loader."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoTokenizer

from wiola.cli import main
from wiola.data.loader import RandomBatchSampler, TokenDataset

from .conftest import DOCUMENTS


def test_tokenizer_then_prepare_then_batches(text_corpus, tmp_path, capsys):
    tok_dir, out = tmp_path / "tok", tmp_path / "data"
    assert main(["tokenizer", str(text_corpus), str(tok_dir), "--vocab-size", "300"]) == 0
    args = ["prepare", "--source", str(text_corpus), "--out", str(out), "--tokenizer", str(tok_dir),
            "--val-fraction", "0.2", "--seed", "3", "--num-workers", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"prepared {out}" in printed and f"{len(DOCUMENTS)} documents" in printed

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["seed"] == 3 and manifest["options"]["val_fraction"] == 0.2
    assert manifest["tokenizer"]["source"]["path"] == str(tok_dir.resolve())
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert int((train == tok.eos_token_id).sum() + (val == tok.eos_token_id).sum()) == len(DOCUMENTS)
    decoded = tok.decode(np.concatenate([train, val]).tolist(), skip_special_tokens=True)
    assert sorted(decoded) == sorted("".join(DOCUMENTS))  # every character of the corpus, once

    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out

    x, y = next(RandomBatchSampler(TokenDataset(out), batch_size=4, seq_len=16, seed=0))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_prepare_trains_a_tokenizer_when_none_is_given(text_corpus, tmp_path):
    out = tmp_path / "data"
    assert main(["prepare", "--source", str(text_corpus), "--out", str(out), "--tokenizer-kind", "char", "--num-workers", "0"]) == 0
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.unk_token == "<|unk|>"
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["source"] == {"train": "char", "vocab_size": 8192}


def test_prepare_user_errors_exit_2(tmp_path, capsys):
    assert main(["prepare", "--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wiola prepare: error: corpus not found") and "\n" not in err
    (tmp_path / "a.txt").write_text("text")
    assert main(["prepare", "--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--val-fraction", "1.5"]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err
