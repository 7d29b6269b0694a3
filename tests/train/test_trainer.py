"""End-to-end `wiola train` runs on a tiny model: outputs, exact resume, failures with clear messages."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from wiola.cli import main
from wiola.evaluate import eval_command
from wiola.train import checkpoint
from wiola.train.trainer import Trainer

from .tinyrun import FAST, read_log, train_losses


def run(config, data, out, *extra):
    return main(["train", str(config), str(data), str(out), *FAST, *map(str, extra)])


def test_train_end_to_end_outputs(dataset, model_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert run(model_config, dataset, out, "--max-steps", 12, "--eval-every", 6, "--save-every", 6) == 0

    records = read_log(out)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 0.5, losses  # it learns
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [6, 12]
    assert all(math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in vals)
    train = [r for r in records if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    assert train[0]["tokens"] == 8 * 32 and train[-1]["tokens"] == 12 * 8 * 32
    assert (out / "loss.png").stat().st_size > 1000

    for name in ("latest", "best", "final"):
        state = checkpoint.load_state(out / "checkpoints" / name)
        assert state["step"] == (12 if name != "best" else min(vals, key=lambda r: r["val_loss"])["step"])
    # out/ itself is a pretrained model with the data's tokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the king").input_ids == AutoTokenizer.from_pretrained(dataset / "tokenizer")("the king").input_ids
    final = checkpoint.load_weights(out / "checkpoints" / "final")
    for name, tensor in model.state_dict().items():
        if name in final:
            assert torch.equal(tensor, final[name]), name
    assert model.config.vocab_size == json.loads((dataset / "manifest.json").read_text())["vocab_size"]
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint directories left behind"


def _interrupt_after(monkeypatch, step):
    """Send this process SIGINT right after optimizer step `step`, through the real signal handler."""
    original = Trainer.train_step

    def train_step(self):
        result = original(self)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_interrupt_and_resume_matches_uninterrupted_run(dataset, model_config, tmp_path, monkeypatch):
    steps = ["--max-steps", 10, "--eval-every", 4, "--save-every", 3, "--micro-batch-size", 4, "--set", "hidden_dropout=0.1"]
    ref = tmp_path / "ref"
    assert run(model_config, dataset, ref, *steps) == 0

    out = tmp_path / "cut"
    _interrupt_after(monkeypatch, 4)
    assert run(model_config, dataset, out, *steps) == 128 + signal.SIGINT
    state = checkpoint.load_state(out / "checkpoints" / "latest")
    assert state["step"] == 5  # the signal is acted on at the end of the next step
    assert not (out / "checkpoints" / "final").exists()
    assert any(r.get("event") == "interrupted" for r in read_log(out))
    monkeypatch.undo()
    # an interrupted run's directory already works as a model: eval falls back to checkpoints/latest
    assert eval_command(str(out), str(dataset), seq_len=32, max_batches=1, device="cpu")["checkpoint"].endswith("latest")

    assert run(model_config, dataset, out, "--resume") == 0  # every option comes back from the checkpoint
    assert train_losses(out) == train_losses(ref)  # bit-exact, dropout included
    val = lambda o: {r["step"]: r["val_loss"] for r in read_log(o) if "val_loss" in r}  # noqa: E731
    assert val(out) == val(ref)
    a, b = checkpoint.load_weights(ref / "checkpoints" / "final"), checkpoint.load_weights(out / "checkpoints" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_full_batch(dataset, model_config, tmp_path):
    full, accum = tmp_path / "full", tmp_path / "accum"
    assert run(model_config, dataset, full, "--max-steps", 4, "--eval-every", 100) == 0
    assert run(model_config, dataset, accum, "--max-steps", 4, "--eval-every", 100, "--micro-batch-size", 2) == 0
    a, b = train_losses(full), train_losses(accum)
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    assert [r["grad_accum"] for r in read_log(accum) if r.get("event") == "start"] == [4]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(dataset, model_config, tmp_path, monkeypatch, capsys):
    original = Trainer.train_step

    def poisoned(self):
        if self.step == 3:  # corrupt the weights before step 4
            with torch.no_grad():
                next(self.raw_model.parameters()).fill_(float("nan"))
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    out = tmp_path / "nan"
    assert run(model_config, dataset, out, "--max-steps", 10, "--save-every", 2, "--eval-every", 100) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 4" in err and "checkpoints/latest" in err
    latest = out / "checkpoints" / "latest"
    assert checkpoint.load_state(latest)["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint.load_weights(latest).values())
    assert not (out / "checkpoints" / "final").exists()
    assert [r["step"] for r in read_log(out) if r.get("event") == "non_finite"] == [4]


def test_resume_with_different_model_config_names_the_fields(dataset, model_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(model_config, dataset, out, "--max-steps", 2, "--eval-every", 100) == 0
    capsys.readouterr()
    assert run(model_config, dataset, out, "--resume", "--set", "hidden_size=48", "num_hidden_layers=3") == 2
    err = capsys.readouterr().err
    assert "hidden_size: checkpoint 32 vs requested 48" in err
    assert "num_hidden_layers: checkpoint 2 vs requested 3" in err
    assert "intermediate_size" not in err


def test_resume_cannot_change_data_layout_and_needs_a_checkpoint(dataset, model_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(model_config, dataset, out, "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert run(model_config, dataset, out, "--max-steps", 2, "--eval-every", 100) == 0
    assert run(model_config, dataset, out, "--max-steps", 2) == 2
    assert "--resume" in capsys.readouterr().err
    assert run(model_config, dataset, out, "--resume", "--max-steps", 4, "--seed", 5) == 2
    assert "seed (1337 -> 5)" in capsys.readouterr().err
    assert run(model_config, dataset, out, "--resume", "--max-steps", 4) == 0  # a longer run continues
    assert sorted(train_losses(out)) == [1, 2, 3, 4]


def test_unwritable_output_directory_is_a_clear_error(dataset, model_config, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert run(model_config, dataset, blocker / "out", "--max-steps", 1) == 2
    err = capsys.readouterr().err
    assert "output directory" in err and "not writable" in err and err.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_output_directory(dataset, model_config, tmp_path, capsys):  # pragma: no cover - root in CI
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert run(model_config, dataset, ro / "out", "--max-steps", 1) == 2
    assert "not writable" in capsys.readouterr().err


def test_per_layer_merge_ratios_are_logged(dataset, tmp_path):
    from .tinyrun import write_model_config

    cfg = write_model_config(tmp_path / "atm.json", num_hidden_layers=3, token_merging="atm", atm_layers=[1], atm_threshold=0.0)
    out = tmp_path / "atm"
    assert run(cfg, dataset, out, "--max-steps", 2, "--eval-every", 100) == 0
    train = [r for r in read_log(out) if "loss" in r]
    assert all(0.0 < r["merge_ratios/1"] <= 0.5 for r in train), train
    assert not any(k.startswith("merge_ratios/0") for r in train for k in r)


def test_config_file_sections_and_unknown_fields(dataset, tmp_path, capsys):
    from .tinyrun import TINY_MODEL

    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"model": TINY_MODEL, "train": {"max_steps": 3, "eval_every": 100, "schedule": "wsd"}}))
    out = tmp_path / "yaml"
    assert main(["train", str(cfg), str(dataset), str(out), "--batch-size", "4", "--seq-len", "16", "--device", "cpu"]) == 0
    assert sorted(train_losses(out)) == [3]  # log_every defaults to 10; the last step is always logged
    saved = checkpoint.load_state(out / "checkpoints" / "final")["train_config"]
    assert saved["schedule"] == "wsd" and saved["max_steps"] == 3 and saved["batch_size"] == 4
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard is on by default

    assert run(cfg, dataset, tmp_path / "typo", "--set", "hiden_size=8") == 2
    assert "did you mean 'hidden_size'" in capsys.readouterr().err
