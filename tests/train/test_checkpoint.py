"""Checkpoint files: atomic replacement, crash recovery, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from wiola.train import checkpoint
from wiola.train.config import build_model, make_model_config

from .tinyrun import TINY_MODEL


def tiny_model(seed):
    torch.manual_seed(seed)
    return build_model(make_model_config(dict(TINY_MODEL, vocab_size=64)))


def save(path, model, step):
    checkpoint.save(path, model=model, model_state=model.state_dict(), trainer_state={"step": step}, tokenizer_dir=None)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    latest = tmp_path / "checkpoints" / "latest"
    old, new = tiny_model(0), tiny_model(1)
    save(latest, old, step=10)

    def crash(*args, **kwargs):  # the weights are already written to the temporary directory at this point
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(latest, new, step=20)
    monkeypatch.undo()

    assert checkpoint.load_state(latest)["step"] == 10
    weights = checkpoint.load_weights(latest)
    assert all(torch.equal(weights[k], v) for k, v in old.state_dict().items() if k in weights)
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest"]  # no half-written directory left

    save(latest, new, step=20)  # the next save works and replaces it
    assert checkpoint.load_state(latest)["step"] == 20


def test_crash_between_renames_is_recovered(tmp_path):
    latest = tmp_path / "latest"
    save(latest, tiny_model(0), step=5)
    aside = tmp_path / ".latest.old"
    latest.rename(aside)  # the state right after "move the old one aside", before the new one moved in
    assert checkpoint.resolve(latest) == latest
    assert checkpoint.load_state(latest)["step"] == 5 and not aside.exists()


def test_copy_is_a_separate_atomic_directory(tmp_path):
    src, dst = tmp_path / "latest", tmp_path / "best"
    first, second = tiny_model(0), tiny_model(1)
    save(src, first, step=3)
    checkpoint.copy_dir_atomic(src, dst)
    save(src, second, step=4)  # rewriting latest must not touch best
    assert checkpoint.load_state(dst)["step"] == 3
    key = "model.embed_tokens.weight"
    assert torch.equal(checkpoint.load_weights(dst)[key], first.state_dict()[key])
    assert torch.equal(checkpoint.load_weights(src)[key], second.state_dict()[key])


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = checkpoint.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_tied_lm_head_is_saved_once_and_restored(tmp_path):
    model = tiny_model(0)
    assert checkpoint.tied_aliases(model) == {"lm_head.weight"}
    save(tmp_path / "ckpt", model, step=1)
    assert "lm_head.weight" not in checkpoint.load_weights(tmp_path / "ckpt")
    other = tiny_model(1)
    checkpoint.load_weights_into(other, tmp_path / "ckpt")
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)
    assert other.lm_head.weight is other.model.embed_tokens.weight


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_get_the_mode_the_umask_gives_other_files(tmp_path, umask):
    """Issue 26: safetensors writes its files 0600, so checkpoints, merged, converted and exported models had
    weights that an engine running as another user could not read, next to 0644 config files."""
    import os

    from wiola.convert import write_destination

    old = os.umask(umask)
    try:
        save(tmp_path / "ckpt", tiny_model(0), 1)  # save_pretrained through atomic_write_dir
        checkpoint.copy_dir_atomic(tmp_path / "ckpt", tmp_path / "copy")
        write_destination(tmp_path / "converted", lambda folder: tiny_model(0).save_pretrained(folder))  # convert, export
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for folder in ("ckpt", "copy", "converted"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / folder).iterdir() if p.is_file()}
        assert "model.safetensors" in modes and "config.json" in modes
        assert set(modes.values()) == {expected}, (folder, {k: oct(v) for k, v in modes.items()})
    assert not list(tmp_path.glob("**/.mode-probe*"))
