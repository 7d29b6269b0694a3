"""Issue 19 on the data side: untrusted manifests, verified tokenizers and shards, interrupted and
failing `prepare` runs (one clear line, nothing left behind), locks and streaming of huge documents."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from wiola.cli import main
from wiola.data import prepare as prepare_module
from wiola.data.manifest import inside, problems, read_manifest, verify
from wiola.data.prepare import prepare, single_document_cut
from wiola.data.tokenizer import save_tokenizer, train_tokenizer
from wiola.errors import WiolaError


def run(source, out, **options):
    options.setdefault("num_workers", 0)
    return prepare(str(source), out, progress=False, **options)


def corpus_file(path: Path, n: int = 40) -> Path:
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "the quick brown fox. " * (i % 7 + 2)}) + "\n"
                            for i in range(n)))
    return path


def one_error_line(text: str, *needles: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("wiola")]
    assert len(lines) == 1 and "Traceback" not in text, text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ (1) manifest paths


def test_manifest_paths_must_stay_inside(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    assert inside(root, "sub") == (root / "sub").resolve()
    assert inside(root, "train.bin") == (root / "train.bin").resolve()
    for bad in ("../outside", str(tmp_path / "outside"), "/etc", "escape", "sub/../../outside", "", None, 3):
        with pytest.raises(WiolaError):
            inside(root, bad)


def test_read_manifest_refuses_hostile_entries(tmp_path):
    out = tmp_path / "data"
    run(corpus_file(tmp_path / "c.jsonl"), out, tokenizer_kind="char")
    manifest = json.loads((out / "manifest.json").read_text())
    for edit in (lambda m: m["splits"]["val"].update(file="/etc/passwd"),
                 lambda m: m["splits"]["train"].update(num_tokens="many"),
                 lambda m: m["tokenizer"].update(path="../../"),
                 lambda m: m.update(dtype="no-such-type")):
        bad = json.loads(json.dumps(manifest))
        edit(bad)
        (out / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(WiolaError):
            read_manifest(out)


# ------------------------------------------------------------------ (8) tokenizer hash and shard hashes


def test_replaced_tokenizer_is_noticed_by_prepare_and_verify(tmp_path, capsys):
    source, out = corpus_file(tmp_path / "c.jsonl"), tmp_path / "data"
    run(source, out, tokenizer_kind="char")
    manifest = read_manifest(out)
    assert all(len(info["sha256"]) == 64 for info in manifest["splits"].values())
    verify(out, manifest, deep=True)
    save_tokenizer(train_tokenizer(["other text entirely"], kind="char"), out / "tokenizer")  # replaced in place
    assert any("has changed" in p for p in problems(out, manifest))
    capsys.readouterr()
    again = run(source, out, tokenizer_kind="char")
    assert not again["up_to_date"]  # not "up to date": prepared again
    verify(out, read_manifest(out))


def test_deep_verify_finds_a_flipped_byte(tmp_path):
    out = tmp_path / "data"
    run(corpus_file(tmp_path / "c.jsonl"), out, tokenizer_kind="char")
    with open(out / "train.bin", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    verify(out, read_manifest(out))  # sizes only: cheap, passes
    with pytest.raises(WiolaError, match="sha256"):
        verify(out, read_manifest(out), deep=True)


# ------------------------------------------------------------------ (10)/(11) failures: one line, nothing left


def test_full_disk_during_prepare_keeps_the_old_data(tmp_path, monkeypatch, capsys):
    source, out = corpus_file(tmp_path / "c.jsonl"), tmp_path / "data"
    run(source, out, tokenizer_kind="char")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.bin"))

    monkeypatch.setattr(prepare_module, "_write_splits", full)
    capsys.readouterr()
    assert main(["prepare", "--source", str(source), "--out", str(out), "--tokenizer-kind", "char", "--force"]) == 2
    one_error_line(capsys.readouterr().err, "no space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(out.glob(".prepare-*"))
    assert main(["prepare", "--source", str(source), "--out", str(tmp_path / "new" / "data"), "--tokenizer-kind", "char"]) == 2
    assert not (tmp_path / "new").exists()  # no empty output directory left behind


def test_stale_prepare_folders_are_removed(tmp_path):
    source, out = corpus_file(tmp_path / "c.jsonl"), tmp_path / "data"
    (out / ".prepare-killed").mkdir(parents=True)
    (out / ".prepare-killed" / "train.bin").write_bytes(b"x" * 100)
    run(source, out, tokenizer_kind="char")
    assert not list(out.glob(".prepare-*"))
    (out / ".prepare-killed2").mkdir()
    assert run(source, out, tokenizer_kind="char")["up_to_date"]
    assert not list(out.glob(".prepare-*"))


def _run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env,
                          start_new_session=True)  # its own process group: a group-wide Ctrl-C stays there


def test_sigterm_during_prepare_leaves_no_temporary_folder(tmp_path):
    corpus_file(tmp_path / "c.jsonl")
    done = _run_script(tmp_path, f"""
        import os, signal, sys
        from wiola.data import prepare
        real = prepare._write_splits
        def terminated(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` while tokenizing
            return real(*args, **kwargs)
        prepare._write_splits = terminated
        from wiola.cli import main
        sys.exit(main(["prepare", "--source", {str(tmp_path / 'c.jsonl')!r}, "--out", {str(tmp_path / 'out')!r},
                       "--tokenizer-kind", "char"]))
    """)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # staging removed, and the directory it created too


def test_ctrl_c_with_two_workers_is_one_line(tmp_path):
    # enough documents that batches are still pending when the interrupt lands
    corpus_file(tmp_path / "c.jsonl", n=4000)
    done = _run_script(tmp_path, f"""
        import os, signal, sys, time
        # a terminal's Ctrl-C: a process started in the background (nohup, `cmd &`) inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from wiola.data import encode
        real = encode._encode_in_worker
        def worker(texts):
            try:
                os.mkdir({str(tmp_path / 'flag')!r})
            except FileExistsError:
                return real(texts)
            os.killpg(0, signal.SIGINT)  # Ctrl-C reaches the whole process group, workers included
            time.sleep(2)
            return real(texts)
        encode._encode_in_worker = worker  # forked workers inherit it
        from wiola.cli import main
        sys.exit(main(["prepare", "--source", {str(tmp_path / 'c.jsonl')!r}, "--out", {str(tmp_path / 'out')!r},
                       "--tokenizer-kind", "char", "--num-workers", "2"]))
    """)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "wiola: interrupted"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ (5) --val-fraction 0


def test_val_fraction_0_is_recorded_and_verifiable(tmp_path):
    out = tmp_path / "data"
    summary = run(corpus_file(tmp_path / "c.jsonl"), out, tokenizer_kind="char", val_fraction=0.0)
    manifest = read_manifest(out)
    assert summary["val_tokens"] == 0 and manifest["options"]["val_fraction"] == 0.0
    verify(out, manifest, deep=True)
    assert np.fromfile(out / "val.bin", dtype=manifest["dtype"]).size == 0


# ------------------------------------------------------------------ (9) streaming: bounded pieces, same tokens


def test_huge_single_line_is_encoded_in_bounded_pieces_with_the_same_tokens(tmp_path, monkeypatch, bpe_dir):
    from transformers import AutoTokenizer

    from wiola.data import encode as encode_module
    from wiola.data.corpus import decode_utf8

    words = ["alpha", "beta,", "gamma.", "δέλτα", "日本語", "🤖", "x1", "(paren)", "end"]
    rng = np.random.default_rng(0)
    line = " ".join(words[i] for i in rng.integers(0, len(words), 3000))  # one line, ~19k characters
    raw = ("\ufeff" + line).encode() + b"\xff\xfe broken bytes " + line.encode() + b"\n"
    (tmp_path / "one.txt").write_bytes(raw)
    seen: list[int] = []
    real = encode_module.encode_texts

    def spy(tokenizer, texts, dtype):
        seen.extend(len(t) for t in texts)
        return real(tokenizer, texts, dtype)

    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 500)
    monkeypatch.setattr(encode_module, "encode_texts", spy)
    summary = run(tmp_path / "one.txt", tmp_path / "out", tokenizer=str(bpe_dir), val_fraction=0.0)
    assert max(seen) <= 500 and len(seen) > 30  # never the whole line at once
    text, bad = decode_utf8(raw)
    assert summary["replaced_bytes"] == bad == 2
    manifest = read_manifest(tmp_path / "out")
    tokens = np.fromfile(tmp_path / "out" / "train.bin", dtype=manifest["dtype"]).tolist()
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    whole = tok.encode(text.removeprefix("\ufeff"), add_special_tokens=False, split_special_tokens=True)
    assert tokens == whole + [manifest["eos_token_id"]]  # cuts at pre-token boundaries change nothing


def test_streamed_single_document_cut_equals_the_in_memory_one(tmp_path, monkeypatch):
    from wiola.data.corpus import Corpus
    from wiola.data.prepare import stream_cut

    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 40)
    rng = np.random.default_rng(1)
    for k in range(30):
        parts = rng.choice(["word ", "x", "\n", "  ", "longerword "], size=int(rng.integers(2, 200)))
        text = "z" + "".join(parts) + "z"
        (tmp_path / f"{k}.txt").write_text(text)
        for fraction in (0.05, 0.3, 0.9):
            for split_at in ("line", "exact"):
                got = stream_cut(Corpus(str(tmp_path / f"{k}.txt")), len(text), fraction, split_at)
                assert got == single_document_cut(text, fraction, split_at), (text, fraction, split_at)


def test_a_given_tokenizer_folder_of_links_still_prepares(tmp_path, bpe_dir):
    """Hub cache snapshots are folders of links: `--tokenizer` may name one; the copy in the data is plain files."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for file in bpe_dir.iterdir():
        (snapshot / file.name).symlink_to(file)
    out = tmp_path / "data"
    run(corpus_file(tmp_path / "c.jsonl"), out, tokenizer=str(snapshot))
    assert not any(p.is_symlink() for p in (out / "tokenizer").iterdir())
    verify(out, read_manifest(out))
