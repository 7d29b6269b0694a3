"""`wiola eval`: loss, perplexity and bits per byte of a trained tiny model, checked independently."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.train.tinyrun import FAST, make_dataset, read_log, write_model_config
from wiola.cli import main
from wiola.evaluate import eval_command


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_dataset(root / "data")
    out = root / "run"
    assert main(["train", str(write_model_config(root / "m.json")), str(data), str(out), *FAST,
                 "--max-steps", "6", "--eval-every", "6"]) == 0
    return data, out


def test_eval_json_matches_independent_computation(trained, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, out = trained
    capsys.readouterr()
    assert main(["eval", str(out), str(data), "--seq-len", "16", "--batch-size", "4", "--max-batches", "3", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    tokens = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    rows = torch.stack([tokens[j * 16 : j * 16 + 17] for j in range(12)])  # 3 batches x 4 windows of 16 + 1 tokens
    with torch.no_grad():
        logits = model(rows[:, :-1]).logits
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum").item()
    n_bytes = sum(len(tok.decode(row[1:]).encode("utf-8")) for row in rows.tolist())
    assert result["tokens"] == 12 * 16 and result["bytes"] == n_bytes
    assert result["loss"] == pytest.approx(nll / (12 * 16), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert result["split"] == "val" and result["checkpoint"].endswith("run")


def test_eval_equals_the_validation_loss_logged_during_training(trained, capsys):
    data, out = trained
    logged = [r["val_loss"] for r in read_log(out) if "val_loss" in r][-1]
    # training validated eval_batches=2 batches of batch_size=8 sequences of 32 tokens
    result = eval_command(str(out / "checkpoints" / "final"), str(data), seq_len=32, batch_size=8, max_batches=2, device="cpu")
    assert result["loss"] == pytest.approx(logged, abs=1e-6)
    text = capsys.readouterr().out
    assert "bits per byte" in text and "perplexity" in text


def test_eval_errors_are_one_line(trained, tmp_path, capsys):
    data, out = trained
    assert main(["eval", str(out), str(data), "--seq-len", "65"]) == 2
    assert "exceeds the model's max_position_embeddings 64" in capsys.readouterr().err
    assert main(["eval", str(out), str(data), "--split", "test"]) == 2
    assert "no split 'test'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing"), str(data)]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_f3n_levels_match_the_model_at_each_level(tmp_path, capsys):
    """`--f3n-level all` evaluates one trained F3N model at every granularity: each loss is the model's own at
    that level (config f3n_level), FLOPs fall with the level, and level G is the plain evaluation."""
    from wiola import WiolaForCausalLM
    from wiola.configuration_wiola import flops_per_token

    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    cfg = write_model_config(tmp_path / "m.json", mlp="f3n", f3n_levels=3, f3n_sampling="layer")
    assert main(["train", str(cfg), str(data), str(out), *FAST, "--max-steps", "4", "--eval-every", "4"]) == 0
    log = [r for r in read_log(out) if "f3n_levels/0" in r]
    assert log and all(1 <= r["f3n_levels/0"] <= 3 for r in log)  # the drawn levels are logged
    capsys.readouterr()
    assert main(["eval", str(out), str(data), "--seq-len", "16", "--batch-size", "4", "--max-batches", "2", "--json",
                 "--device", "cpu", "--f3n-level", "all"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["f3n_level"] for r in results] == [[1, 1], [2, 2], [3, 3]]
    flops = [r["flops_per_token"] for r in results]
    assert flops[0] < flops[1] < flops[2]
    plain = eval_command(str(out), str(data), seq_len=16, batch_size=4, max_batches=2, device="cpu")
    assert results[2]["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    tokens = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    rows = torch.stack([tokens[j * 16 : j * 16 + 17] for j in range(8)])  # 2 batches x 4 windows of 16 + 1 tokens
    for r in results:  # the model built at that level (config f3n_level), computed directly
        model = WiolaForCausalLM.from_pretrained(out, f3n_level=r["f3n_level"][0]).eval()
        assert r["flops_per_token"] == flops_per_token(model.config, context=16)
        with torch.no_grad():
            logits = model(rows[:, :-1]).logits
        assert r["loss"] == pytest.approx(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item(), rel=1e-5)
    assert main(["eval", str(out), str(data), "--f3n-level", "7", "--device", "cpu"]) == 2
    assert "--f3n-level '7'" in capsys.readouterr().err
