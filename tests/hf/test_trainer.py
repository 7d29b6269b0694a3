"""`transformers.Trainer` computes the loss of the whole batch: gradient accumulation and two gloo processes
log the single-batch loss, for every model family (the model honours `num_items_in_batch`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .trainer_run import FAMILIES, GLOBAL_BATCH, run

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    return {family: run(family, GLOBAL_BATCH, 1, str(out)) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_accumulation_logs_the_batch_loss(single, family, tmp_path):
    accumulated = run(family, GLOBAL_BATCH // 4, 4, str(tmp_path))
    assert len(accumulated) == len(single[family]) == 3
    assert accumulated == pytest.approx(single[family], abs=1e-5)


def test_num_items_in_batch_normalises_over_the_whole_batch():
    from wiola import WiolaConfig, WiolaForCausalLM

    model = WiolaForCausalLM(WiolaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16)).eval()
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    mean = model(ids, labels=labels).loss
    counted = int((labels[:, 1:] != -100).sum())
    total = model(ids, labels=labels, num_items_in_batch=torch.tensor(3 * counted)).loss
    torch.testing.assert_close(total * 3, mean)
    assert WiolaForCausalLM.accepts_loss_kwargs


def test_two_gloo_processes_log_the_single_process_loss(single, tmp_path):
    path = os.pathsep.join([str(SRC), str(SRC.parent), os.environ.get("PYTHONPATH", "")])  # src/, and the root for `tests`
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("trainer_run.py")), str(out), str(GLOBAL_BATCH // 2), "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = json.loads(out.read_text())
    for family in FAMILIES:
        assert ddp[family] == pytest.approx(single[family], abs=1e-5), family
