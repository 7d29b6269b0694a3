"""Checkpoints of wiola 0.2.0.dev's GCLA layout (dead layer-0 tensors, scalar φ) still load, evaluate,
resume and convert, with outputs unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.train.tinyrun import FAST, make_dataset, train_losses, write_model_config
from wiola import legacy
from wiola.cli import main
from wiola.convert import convert_checkpoint
from wiola.train import checkpoint

PAPER = dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", dsff_wide_size=64, norm="wiola_rmsnorm",
             num_hidden_layers=3)


def make_legacy(folder, optimizer: bool = False) -> None:
    """Rewrite a checkpoint folder into the old layout: layer-0 context tensors and scalar φ."""
    weights = load_file(str(folder / "model.safetensors"))
    d = weights["model.layers.1.self_attn.k_ctx_proj.weight"]
    weights["model.layers.0.self_attn.k_ctx_proj.weight"] = torch.randn_like(d)
    weights["model.layers.0.self_attn.v_ctx_proj.weight"] = torch.randn_like(d)
    weights["model.layers.0.self_attn.blend_logit"] = torch.tensor(-3.0)
    for key in list(weights):
        if key.endswith("blend_logit"):
            weights[key] = weights[key].reshape(())
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if optimizer:
        path = folder / checkpoint.STATE_FILE
        state = torch.load(path, weights_only=False)
        opt = state["optimizer"]
        opt["param_groups"][0]["params"] += [k for k in legacy.DEAD]  # listed, but never stepped: no state
        for key, entry in opt["state"].items():
            if key.endswith("blend_logit"):
                for name, value in entry.items():
                    if name != "step":
                        entry[name] = value.reshape(())
        torch.save(state, path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("legacy") / "data")


def test_legacy_training_checkpoint_resumes_exactly(data, tmp_path, capsys):
    """A run whose step-2 checkpoint has the old layout (weights and optimizer state) resumes to the losses
    of an uninterrupted run (constant schedule, so that --max-steps may grow on resume)."""
    cfg = write_model_config(tmp_path / "m.json", **PAPER)
    opts = [*FAST, "--schedule", "constant", "--eval-every", "100"]
    whole, old = tmp_path / "whole", tmp_path / "old"
    assert main(["train", str(cfg), str(data), str(whole), *opts, "--max-steps", "4"]) == 0
    assert main(["train", str(cfg), str(data), str(old), *opts, "--max-steps", "2"]) == 0
    make_legacy(old / "checkpoints" / "latest", optimizer=True)
    assert legacy.needs_upgrade(old / "checkpoints" / "latest")
    assert main(["train", str(cfg), str(data), str(old), "--resume", "--max-steps", "4"]) == 0
    assert train_losses(old) == train_losses(whole) and sorted(train_losses(whole)) == [1, 2, 3, 4]
    assert not legacy.needs_upgrade(old / "checkpoints" / "final")


def test_legacy_checkpoint_loads_evaluates_and_converts(data, tmp_path, capsys):
    cfg = write_model_config(tmp_path / "m.json", **PAPER)
    run = tmp_path / "run"
    assert main(["train", str(cfg), str(data), str(run), *FAST, "--max-steps", "3", "--eval-every", "100"]) == 0
    assert main(["eval", str(run), str(data), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    make_legacy(run)
    assert legacy.needs_upgrade(run)
    assert main(["eval", str(run), str(data), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["loss"] == expected["loss"]
    assert "old GCLA layout" in captured.err or "layout of wiola 0.2.0.dev" in captured.err
    model = convert_checkpoint(run, tmp_path / "new", quiet=True)
    assert not legacy.needs_upgrade(tmp_path / "new")
    assert model.model.layers[1].self_attn.blend_logit.shape == (1,)
    assert main(["eval", str(tmp_path / "new"), str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == expected["loss"]
