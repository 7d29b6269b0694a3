"""Resume when some parameters have no optimizer state yet (AdamW creates it at the first gradient)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from wiola.train import distributed


class TwoPaths(nn.Module):
    """`late` receives no gradient until `use_late` is switched on."""

    def __init__(self):
        super().__init__()
        self.early, self.late = nn.Linear(4, 4), nn.Linear(4, 4)
        self.use_late = False

    def forward(self, x):
        y = self.early(x)
        return y + self.late(x) if self.use_late else y


def _step(model, opt, x):
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()


def test_parameters_without_state_start_fresh_and_resume_is_exact(capsys):
    torch.manual_seed(0)
    model = TwoPaths()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    xs = [torch.randn(3, 4) for _ in range(6)]
    for x in xs[:3]:
        _step(model, opt, x)
    saved_weights = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(distributed.full_optimizer_state(model, opt))  # (CPU tensors are not copied)
    assert "late.weight" not in saved["state"] and "early.weight" in saved["state"]

    model.use_late = True  # the uninterrupted run: `late` starts learning at step 4
    for x in xs[3:]:
        _step(model, opt, x)

    again = TwoPaths()
    again.load_state_dict(saved_weights)
    again.use_late = True
    opt2 = torch.optim.AdamW(again.parameters(), lr=0.05, weight_decay=0.1)
    fresh = distributed.load_optimizer_state(again, opt2, saved)
    assert sorted(fresh) == ["late.bias", "late.weight"]
    for x in xs[3:]:
        _step(again, opt2, x)
    for name, p in model.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name


def test_nothing_missing_reports_nothing():
    model = TwoPaths()
    model.use_late = True
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt, torch.randn(2, 4))
    state = copy.deepcopy(distributed.full_optimizer_state(model, opt))
    again = copy.deepcopy(model)
    again.zero_grad(set_to_none=True)
    assert distributed.load_optimizer_state(again, torch.optim.AdamW(again.parameters()), state) == []


def test_train_resume_says_which_parameters_start_fresh(dataset, model_config, tmp_path, capsys):
    """`wiola train --resume` on a checkpoint where a parameter has no optimizer state: one line, and on."""
    from wiola.cli import main
    from wiola.train import checkpoint

    from .tinyrun import FAST

    out = tmp_path / "run"
    assert main(["train", str(model_config), str(dataset), str(out), *FAST, "--max-steps", "2", "--save-every", "2"]) == 0
    path = out / "checkpoints" / "latest" / checkpoint.STATE_FILE
    state = torch.load(path, weights_only=False)
    del state["optimizer"]["state"]["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, path)
    capsys.readouterr()
    assert main(["train", str(model_config), str(dataset), str(out), "--resume", "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "resume: 1 parameter(s) had no optimizer state yet" in err and "model.layers.1.mlp.up_proj.weight" in err
