"""`wiola train --document-mask`: position ids restart after each eos, so the documents of a training
window stay apart (the model side is tested in tests/model/test_packing.py)."""

from __future__ import annotations

import torch

from wiola.cli import main
from wiola.train.batches import document_positions

from .tinyrun import FAST, train_losses, write_model_config


def test_positions_restart_after_each_eos():
    eos = 2
    ids = torch.tensor([[5, 2, 7, 8, 2, 9], [2, 2, 4, 5, 6, 7]])
    assert document_positions(ids, eos).tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]


def test_windows_are_scored_as_their_documents(dataset, tmp_path):
    """A window's logits under the document mask equal each document scored alone."""
    from transformers import AutoModelForCausalLM

    from wiola.train.batches import eval_batches, special_token_ids, read_manifest

    cfg = write_model_config(tmp_path / "m.json", position_encoding="srpe", cross_layer_context="gcla",
                             attention_gate="gsa", token_merging="atm", atm_threshold=-1.0, num_hidden_layers=3,
                             max_position_embeddings=256)
    out = tmp_path / "run"
    assert main(["train", str(cfg), str(dataset), str(out), *FAST, "--max-steps", "3", "--document-mask"]) == 0
    plain = tmp_path / "plain"
    assert main(["train", str(cfg), str(dataset), str(plain), *FAST, "--max-steps", "3"]) == 0
    assert train_losses(out) != train_losses(plain)

    eos = special_token_ids(dataset, read_manifest(dataset))["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, _ = next(iter(eval_batches(dataset, "val", batch_size=1, seq_len=256)))
    cuts = [0] + [i + 1 for i in (ids[0] == eos).nonzero().flatten().tolist() if i + 1 < ids.shape[1]] + [ids.shape[1]]
    assert len(cuts) > 3  # several documents in the window
    with torch.no_grad():
        packed = model(ids, position_ids=document_positions(ids, eos)).logits
        for a, b in zip(cuts[:-1], cuts[1:]):
            torch.testing.assert_close(packed[:, a:b], model(ids[:, a:b]).logits, atol=1e-5, rtol=0)
