"""A tiny `transformers.Trainer` run of a Wiola model, importable by the tests and runnable under torchrun:

    torchrun --nproc_per_node=2 tests/hf/trainer_run.py OUT.json PER_DEVICE ACCUM

writes {family: [logged loss per step]} for every family (rank 0 only).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from tests.train.tinyrun import FAMILIES

GLOBAL_BATCH, STEPS, VOCAB, LENGTH = 8, 3, 97, 24


class Rows(torch.utils.data.Dataset):
    """Random rows whose labels mask a different number of tokens in each row, so that a per-micro-batch
    mean and the mean over the whole batch differ."""

    def __init__(self, n: int = GLOBAL_BATCH * STEPS):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
        self.cut = torch.randint(2, LENGTH - 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: int(self.cut[i])] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def run(family: str, per_device: int, accum: int, out_dir: str) -> list[float]:
    from transformers import Trainer, TrainingArguments

    from wiola import WiolaConfig, WiolaForCausalLM

    torch.manual_seed(0)
    config = WiolaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, max_position_embeddings=64), **FAMILIES[family]})
    model = WiolaForCausalLM(config)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=accum, max_steps=STEPS,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_drop_last=True, disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    from wiola.train.hf_callbacks import F3NLevels

    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[F3NLevels()])
    trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


if __name__ == "__main__":
    out, per_device, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = {family: run(family, per_device, accum, tmp) for family in FAMILIES}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        sys.exit(0)
    with open(out, "w") as f:
        json.dump(results, f)
