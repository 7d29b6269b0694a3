"""TRL's `SFTTrainer(packing=True)` trains a Wiola model, and the packed batches it builds keep documents apart
(position_ids restart at 0; the model turns them into block-diagonal attention and per-document means)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): i + 3 for i, c in enumerate(range(97, 123))}, " ": 29}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return fast


def test_sft_trainer_packing_runs_and_documents_stay_apart(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from wiola import WiolaConfig, WiolaForCausalLM

    torch.manual_seed(0)
    config = WiolaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, max_position_embeddings=128, position_encoding="srpe", cross_layer_context="gcla",
                         attention_gate="gsa", token_merging="atm", atm_threshold=-1.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = WiolaForCausalLM(config)
    texts = ["the king speaks to the crown", "a fool mocks", "my lord follows the night and the sea", "sweet romeo"] * 8
    data = datasets.Dataset.from_dict({"text": texts})
    # TRL turns checkpointing on under its old name, `gradient_checkpointing`, which transformers 5.25 deprecates
    # (a FutureWarning); where the new name exists, say the same under it
    renamed = {"activation_checkpointing": True} if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)} else {}
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=64, per_device_train_batch_size=2, max_steps=3,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
                     bf16=False, **renamed)  # fp32, so that the check below can ask for 1e-5
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(tmp_path))
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))

    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch
    positions, ids = batch["position_ids"][:1], batch["input_ids"][:1]
    starts = [0] + (positions[0, 1:] == 0).nonzero().flatten().add(1).tolist() + [ids.shape[1]]
    assert len(starts) > 3  # several documents packed into the row
    model.eval()
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        for a, b in zip(starts[:-1], starts[1:]):
            torch.testing.assert_close(packed[:, a:b], model(ids[:, a:b]).logits, atol=1e-5, rtol=0)
