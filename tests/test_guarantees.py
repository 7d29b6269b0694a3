"""Issue 19, "nothing lost, nothing trusted": one test per failure case, on a tiny model and corpus.

Case numbers refer to the issue: (1) hostile manifests, (2) --resume --lr, (3) resume on other
data, (4) concurrent writers, (5) validation before step 1, (6) convert --force on a full disk,
(7) independent checkpoints, (8) tokenizer and shard verification, (10) one-line errors,
(11) no leftovers, (12) the smaller ones. Data-side cases are in tests/data/test_hostile.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wiola.cli import main
from wiola.data.lock import LOCK_NAME, DirLock, shared_lock
from wiola.errors import WiolaError
from wiola.train import checkpoint
from wiola.train.config import TrainConfig, make_model_config
from wiola.train.optim import lr_multiplier

from .train.tinyrun import FAST, make_dataset, read_log, train_losses, write_model_config

FIXTURES = Path(__file__).parent / "fixtures"
GSA = FIXTURES / "wiola13m" / "gsa_tied"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("g") / "data", n_docs=200)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return write_model_config(tmp_path_factory.mktemp("gcfg") / "tiny.json")


@pytest.fixture(scope="module")
def trained(data, cfg, tmp_path_factory):
    """One finished 4-step run (latest/best/final written) shared by the read-only tests."""
    out = tmp_path_factory.mktemp("grun") / "run"
    assert train(cfg, data, out, "--max-steps", 4, "--eval-every", 2, "--save-every", 2) == 0
    return out


def train(cfg, data, out, *extra):
    return main(["train", str(cfg), str(data), str(out), *FAST, *map(str, extra)])


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("wiola")]  # (progress bars aside)
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def copy_data(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst, ignore=shutil.ignore_patterns(LOCK_NAME))
    return dst


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------ (1) hostile manifests


def test_manifest_paths_outside_the_data_dir_are_refused(data, cfg, tmp_path, capsys):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "credentials.txt").write_text("token=hunter2")
    shutil.copy(data / "tokenizer" / "tokenizer.json", secrets / "tokenizer.json")
    for name, edit in [("tok", lambda m: m["tokenizer"].update(path=str(secrets))),
                       ("tokrel", lambda m: m["tokenizer"].update(path="../secrets")),
                       ("split", lambda m: m["splits"]["train"].update(file="../data/train.bin"))]:
        bad = copy_data(data, tmp_path / name)
        edit_manifest(bad, edit)
        assert train(cfg, bad, tmp_path / f"out-{name}", "--max-steps", 1) == 2
        one_error_line(capsys, "outside the data directory")
        assert not (tmp_path / f"out-{name}").exists()


def test_only_tokenizer_files_are_copied_and_never_over_model_files(data, cfg, tmp_path, capsys):
    bad = copy_data(data, tmp_path / "data")
    (bad / "tokenizer" / "credentials.txt").write_text("token=hunter2")
    (bad / "tokenizer" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    (bad / "tokenizer" / "model.safetensors").write_bytes(b"not weights")
    out = tmp_path / "run"
    assert train(cfg, bad, out, "--max-steps", 2, "--eval-every", 2) == 0
    for folder in (out, out / "checkpoints" / "final", out / "checkpoints" / "latest"):
        assert not (folder / "credentials.txt").exists()
        assert json.loads((folder / "config.json").read_text())["model_type"] == "wiola"
        assert (folder / "tokenizer.json").read_bytes() == (bad / "tokenizer" / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(["generate", str(out), "the", "--max-new-tokens", "3", "--device", "cpu", "--no-stream"]) == 0


def test_a_linked_tokenizer_file_is_refused(data, cfg, tmp_path, capsys):
    bad = copy_data(data, tmp_path / "data")
    (tmp_path / "elsewhere.json").write_bytes((bad / "tokenizer" / "tokenizer_config.json").read_bytes())
    (bad / "tokenizer" / "tokenizer_config.json").unlink()
    (bad / "tokenizer" / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere.json")
    assert train(cfg, bad, tmp_path / "out", "--max-steps", 1) == 2
    one_error_line(capsys, "link")


# ------------------------------------------------------------------ (2) --resume --lr


def test_resume_with_a_new_lr_recomputes_and_records_the_schedule(data, cfg, tmp_path):
    out = tmp_path / "run"
    assert train(cfg, data, out, "--max-steps", 4, "--save-every", 2, "--eval-every", 100) == 0
    assert main(["train", str(cfg), str(data), str(out), "--resume", "--max-steps", "8", "--lr", "1e-2",
                 "--beta2", "0.99", "--no-tensorboard"]) == 0
    new = TrainConfig.layered({**json.loads((out / "checkpoints" / "final" / "trainer_state.json").read_text())["train_config"]})
    assert (new.lr, new.min_lr, new.beta2, new.max_steps) == (1e-2, pytest.approx(1e-3), 0.99, 8)  # min_lr followed lr
    lrs = {r["step"]: r["lr"] for r in read_log(out) if "lr" in r}
    expected = lr_multiplier(new)
    for step in range(5, 9):  # the logged lr is the one for the next step: lr * multiplier(step)
        assert lrs[step] == pytest.approx(1e-2 * expected(step)), (step, lrs)
    assert lrs[8] == pytest.approx(1e-3)  # the floor is the new min_lr, not a mix of old and new
    state = checkpoint.load_state(out / "checkpoints" / "final")
    assert all(g["betas"] == (0.9, 0.99) and g["initial_lr"] == 1e-2 for g in state["optimizer"]["param_groups"])
    resume = [r for r in read_log(out) if r.get("event") == "resume"][0]
    assert resume["changed"]["lr"] == [3e-3, 1e-2] and resume["step"] == 4


# ------------------------------------------------------------------ (3) resume on other data


def test_resume_on_other_data_is_refused_unless_allowed(data, cfg, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(cfg, data, out, "--max-steps", 2, "--eval-every", 100) == 0
    other = make_dataset(tmp_path / "other", n_docs=150)
    capsys.readouterr()
    assert train(cfg, other, out, "--resume", "--max-steps", 3) == 2
    one_error_line(capsys, "not the data this run was trained on", "--allow-new-data")
    assert sorted(train_losses(out)) == [1, 2]
    assert train(cfg, other, out, "--resume", "--max-steps", 3, "--allow-new-data") == 0
    changed = [r for r in read_log(out) if r.get("event") == "data_changed"]
    assert len(changed) == 1 and changed[0]["to"]["path"] == str(other.resolve())
    assert checkpoint.load_state(out / "checkpoints" / "final")["data_source"]["path"] == str(other.resolve())


def test_resume_on_the_same_tokens_prepared_elsewhere_is_accepted(data, cfg, tmp_path, capsys):
    """The same corpus prepared again from another file (another fingerprint) gives the same tokens: no refusal."""
    from wiola.data.manifest import content_id, read_manifest

    out = tmp_path / "run"
    assert train(cfg, data, out, "--max-steps", 2, "--eval-every", 100) == 0
    again = make_dataset(tmp_path / "again", n_docs=200)
    assert read_manifest(again)["fingerprint"] != read_manifest(data)["fingerprint"]
    assert content_id(read_manifest(again)) == content_id(read_manifest(data))
    assert train(cfg, again, out, "--resume", "--max-steps", 3) == 0
    assert not [r for r in read_log(out) if r.get("event") == "data_changed"] and sorted(train_losses(out)) == [1, 2, 3]


# ------------------------------------------------------------------ (4) concurrent writers


def test_a_second_writer_gets_one_clear_line(data, cfg, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with DirLock(out / LOCK_NAME, "wiola train"):  # what a running `wiola train` holds (flock: per open file)
        assert train(cfg, data, out, "--max-steps", 1) == 2
        one_error_line(capsys, "in use by another wiola process", f"pid {os.getpid()}")
        assert not (out / "log.jsonl").exists()
    with shared_lock(data, "wiola train"):  # a training reads the data: prepare cannot rewrite it
        source = tmp_path / "c.txt"
        source.write_text("some text\n" * 50)
        assert main(["prepare", "--source", str(source), "--out", str(data), "--tokenizer-kind", "char"]) == 2
        one_error_line(capsys, "in use by another wiola process")
    assert json.loads((data / "manifest.json").read_text())["vocab_size"] == 320  # untouched
    dst = tmp_path / "conv"
    with DirLock(tmp_path / ".conv.wiola.lock", "wiola convert"):
        assert main(["convert", str(GSA), str(dst)]) == 2
        one_error_line(capsys, "in use by another wiola process")
    assert not dst.exists()


def test_two_processes_on_one_output_directory(data, cfg, tmp_path):
    """A real second process: it fails at once while the first holds the directory."""
    out = tmp_path / "run"
    out.mkdir()
    code = (f"import sys; from wiola.data.lock import claim_dir\n"
            f"with claim_dir({str(out)!r}, 'wiola train'):\n    print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WiolaError, match=r"in use by another wiola process \(pid \d+: wiola train\)"):
            DirLock(out / LOCK_NAME, "wiola train").acquire()
    finally:
        holder.communicate("", timeout=30)
    with DirLock(out / LOCK_NAME, "wiola train"):  # released with its process
        pass
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------ (5) validated before step 1


@pytest.mark.parametrize("case", ["missing", "short"])
def test_a_bad_val_split_fails_before_step_1(data, cfg, tmp_path, capsys, case):
    bad = copy_data(data, tmp_path / "data")
    if case == "missing":
        edit_manifest(bad, lambda m: m["splits"].pop("val"))
    else:
        dtype = json.loads((bad / "manifest.json").read_text())["dtype"]
        np.fromfile(bad / "val.bin", dtype=dtype)[:20].tofile(bad / "val.bin")
        edit_manifest(bad, lambda m: m["splits"]["val"].update(num_tokens=20))
    out = tmp_path / "out"
    assert train(cfg, bad, out, "--max-steps", 2) == 2
    one_error_line(capsys, "validation with --seq-len 32 needs at least 33 tokens")
    assert not out.exists()  # nothing trained, nothing left behind


def test_val_fraction_0_data_trains_without_validation(tmp_path, cfg, capsys):
    from wiola.data.prepare import prepare

    source = tmp_path / "c.jsonl"
    source.write_text((data_corpus := "".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(60))))
    prepare(str(source), tmp_path / "data", tokenizer_kind="char", val_fraction=0.0, progress=False)
    out = tmp_path / "run"
    assert train(cfg, tmp_path / "data", out, "--max-steps", 2, "--eval-every", 1) == 0
    assert "no val split" in capsys.readouterr().err and data_corpus
    assert (out / "checkpoints" / "final").is_dir() and not (out / "checkpoints" / "best").exists()
    assert any(r.get("event") == "no_validation" for r in read_log(out))


# ------------------------------------------------------------------ (6) convert --force, full disk


def test_convert_force_on_a_full_disk_keeps_the_old_model(tmp_path, monkeypatch, capsys):
    from wiola.modeling_wiola import WiolaForCausalLM

    dst = tmp_path / "model"
    assert main(["convert", str(GSA), str(dst)]) == 0
    (dst / "model-notes.safetensors").write_bytes(b"user file")  # matched the old --force globs
    (dst / "my_wiola.py").write_text("# user file")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    real = WiolaForCausalLM.save_pretrained

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(WiolaForCausalLM, "save_pretrained", full_disk)
    capsys.readouterr()
    assert main(["convert", str(GSA), str(dst), "--force"]) == 2
    one_error_line(capsys, "no space left on device")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert not list(tmp_path.glob(".model.*"))
    monkeypatch.setattr(WiolaForCausalLM, "save_pretrained", real)
    assert main(["convert", str(GSA), str(dst), "--force"]) == 0
    assert (dst / "model-notes.safetensors").read_bytes() == b"user file" and (dst / "my_wiola.py").is_file()
    # a later conversion removes what an earlier one wrote and this one does not
    recorded = json.loads((dst / ".wiola-convert.json").read_text())["files"]
    assert "model.safetensors" in recorded and "my_wiola.py" not in recorded


# ------------------------------------------------------------------ (7) independent checkpoints


def test_latest_best_and_final_are_independent_files(trained):
    root = trained / "checkpoints"
    inodes = {(root / n / "model.safetensors").stat().st_ino for n in ("latest", "best", "final")}
    assert len(inodes) == 3 and all((root / n / "model.safetensors").stat().st_nlink == 1 for n in ("latest", "final"))


def test_damaging_final_leaves_latest_intact(data, cfg, tmp_path):
    out = tmp_path / "run"
    assert train(cfg, data, out, "--max-steps", 2, "--eval-every", 100) == 0
    final, latest = out / "checkpoints" / "final", out / "checkpoints" / "latest"
    with open(final / "model.safetensors", "r+b") as f:
        f.write(b"\0" * 64)
    assert checkpoint.load_weights(latest)
    with pytest.raises(WiolaError, match="damaged"):
        checkpoint.load_weights(final)


# ------------------------------------------------------------------ (8) tokenizer and shards verified


def test_train_and_eval_refuse_a_replaced_tokenizer(data, cfg, trained, tmp_path, capsys):
    from wiola.data.tokenizer import save_tokenizer, train_tokenizer

    other = copy_data(data, tmp_path / "data")
    shutil.rmtree(other / "tokenizer")
    save_tokenizer(train_tokenizer(["completely different text " * 40], kind="char"), other / "tokenizer")
    assert train(cfg, other, tmp_path / "out", "--max-steps", 1) == 2
    one_error_line(capsys, "tokenizer/ has changed since it was prepared")
    # data prepared (consistently) with another tokenizer: eval refuses, or warns when told to go on
    edit_manifest(other, lambda m: m["tokenizer"].update(sha256=None))
    assert main(["eval", str(trained), str(other), "--max-batches", "1", "--device", "cpu"]) == 2
    one_error_line(capsys, "another tokenizer")
    assert main(["eval", str(trained), str(other), "--max-batches", "1", "--device", "cpu", "--json",
                 "--allow-tokenizer-mismatch"]) == 0
    assert "warning" in capsys.readouterr().err


def test_truncated_shard_is_refused_before_training(data, cfg, tmp_path, capsys):
    bad = copy_data(data, tmp_path / "data")
    with open(bad / "train.bin", "r+b") as f:
        f.truncate(100)
    assert train(cfg, bad, tmp_path / "out", "--max-steps", 1) == 2
    one_error_line(capsys, "train.bin has 100 bytes")


# ------------------------------------------------------------------ (10) tracebacks become one line


def test_damaged_weights_and_trainer_state_are_one_line(trained, data, cfg, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state = run / "checkpoints" / "latest" / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])
    assert train(cfg, data, run, "--resume", "--max-steps", 6) == 2
    line = one_error_line(capsys, "damaged")
    assert "weights_only" not in line
    for target in (run / "model.safetensors", run / "checkpoints" / "final" / "model.safetensors"):
        target.write_bytes(target.read_bytes()[:3000])
    assert main(["eval", str(run), str(data), "--device", "cpu"]) == 2
    one_error_line(capsys, "cannot load a model")
    assert main(["generate", str(run / "checkpoints" / "final"), "x", "--device", "cpu"]) == 2
    one_error_line(capsys, "cannot load a model")


def test_out_that_is_a_file_or_read_only(data, cfg, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train(cfg, data, blocker, "--max-steps", 1) == 2
    one_error_line(capsys, "is not a directory")
    (tmp_path / "c.txt").write_text("some text\n" * 20)
    assert main(["prepare", "--source", str(tmp_path / "c.txt"), "--out", str(blocker), "--tokenizer-kind", "char"]) == 2
    one_error_line(capsys, "exists and is not a directory")
    assert main(["convert", str(GSA), str(blocker)]) == 2
    one_error_line(capsys, "not a directory")
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK_NAME) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert train(cfg, data, tmp_path / "ro", "--max-steps", 1) == 2
    one_error_line(capsys, "not writable", "Read-only file system")
    assert not (tmp_path / "ro").exists()


def test_full_disk_while_training_keeps_the_last_checkpoint(data, cfg, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def fills_up(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    assert train(cfg, data, out, "--max-steps", 4, "--save-every", 2, "--eval-every", 100) == 2
    one_error_line(capsys, "no space left on device")
    assert checkpoint.load_state(out / "checkpoints" / "latest")["step"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_bad_numbers_are_one_line(trained, data, cfg, tmp_path, capsys):
    base = ["generate", str(trained), "the", "--device", "cpu"]
    for extra, needle in [(["--top-k", "-5"], "--top-k"), (["--temperature", "nan"], "--temperature")]:
        assert main(base + extra) == 2
        one_error_line(capsys, needle)
    assert main(["eval", str(trained), str(data), "--seq-len", "0", "--device", "cpu"]) == 2
    one_error_line(capsys, "--seq-len must be positive")
    for item, needle in [("rms_norm_eps=abc", "finite number"), ("hidden_size=abc", "must be an integer, got 'abc'"),
                         ("num_hidden_layers=true", "must be an integer, got True"),
                         ("rms_norm_eps=0", "must be positive"), ("rope_theta=-1", "must be positive"),
                         ("spiral_alpha=NaN", "finite number")]:
        assert train(cfg, data, tmp_path / "out", "--set", item) == 2
        one_error_line(capsys, needle)
    assert not (tmp_path / "out").exists()  # (11) a failed run leaves no empty directory


def test_field_checks_keep_good_values():
    config = make_model_config({"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
                                "intermediate_size": 64}, {"rms_norm_eps": 1, "tie_word_embeddings": False})
    assert config.rms_norm_eps == 1.0 and isinstance(config.rms_norm_eps, float) and not config.tie_word_embeddings


# ------------------------------------------------------------------ (12) smaller ones


def test_missing_layer_weights_are_refused(trained, data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(trained / "checkpoints" / "final", broken)
    tensors = {k: v for k, v in load_file(broken / "model.safetensors").items() if ".layers.1." not in k}
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["eval", str(broken), str(data), "--device", "cpu"]) == 2
    one_error_line(capsys, "weights are incomplete", "model.layers.1.")


def test_a_checkpoint_without_its_tokenizer_is_refused(trained, data, tmp_path, capsys):
    """transformers 5.0 loads a folder without tokenizer files as a default GPT-NeoX tokenizer, silently."""
    from wiola.data.tokenizer import VOCABULARY_FILES

    bare = tmp_path / "bare"
    shutil.copytree(trained / "checkpoints" / "final", bare)
    for name in VOCABULARY_FILES + ("tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    assert main(["generate", str(bare), "the", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    one_error_line(capsys, "cannot load the tokenizer", "no vocabulary")


def test_saved_tokenizer_loads_without_the_package_and_without_a_question(trained):
    """Without `wiola` installed, AutoTokenizer on a checkpoint must not run code or wait for an answer."""
    code = ("import sys; sys.modules['wiola'] = None\n"
            "from transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(trained)!r}, trust_remote_code=False)\n"
            f"tok2 = AutoTokenizer.from_pretrained({str(trained / 'checkpoints' / 'final')!r}, trust_remote_code=False)\n"
            "print(tok('the king').input_ids == tok2('the king').input_ids)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
    assert "custom code" not in done.stdout
