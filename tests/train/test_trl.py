"""TRL smoke test: `SFTTrainer` (packing=False) trains a Wiola model on conversations with the default chat
template, with the loss on assistant tokens only (`assistant_only_loss`, from the template's generation marks)."""

from __future__ import annotations

import dataclasses

import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[finetune]')")


def test_sft_trainer_runs_a_few_steps_on_a_wiola_model(tmp_path):
    from datasets import Dataset

    from wiola import WiolaConfig, WiolaForCausalLM
    from wiola.data.tokenizer import train_tokenizer

    from .test_chat import write_chat

    import json

    rows = [json.loads(line) for line in write_chat(tmp_path / "chat.jsonl", n=48).read_text().splitlines()]
    tok = train_tokenizer((m["content"] for r in rows for m in r["messages"]), vocab_size=300)
    torch.manual_seed(0)
    model = WiolaForCausalLM(WiolaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    # TRL turns checkpointing on under its old name, which transformers 5.25 deprecates: the new name where it exists
    renamed = {"activation_checkpointing": True} if "activation_checkpointing" in {f.name for f in dataclasses.fields(trl.SFTConfig)} else {}
    args = trl.SFTConfig(**renamed, output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                         logging_steps=1, packing=False, report_to=[], save_strategy="no", use_cpu=True, max_length=128,
                         assistant_only_loss=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    # the collated labels score exactly the assistant replies (and their eos)
    batch = next(iter(trainer.get_train_dataloader()))
    scored = [tok.decode(row[row != -100]) for row in batch["labels"]]
    assert all(s and s.endswith("<|eos|>") and "What does" not in s and "<|assistant|>" not in s for s in scored), scored
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight.detach())
