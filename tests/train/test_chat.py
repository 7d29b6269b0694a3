"""Chat: the default template, chat .jsonl with assistant-only loss, and the end-to-end journey
prepare -> train -> LoRA -> merge -> `wiola chat` driven through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wiola.cli import main

from .tinyrun import FAST, train_losses, write_model_config

NAMES = ["the king", "a fool", "my lord", "the queen", "Horatio", "the ghost"]
VERBS = ["speaks to", "follows", "loves", "fears", "greets", "mocks"]


def write_chat(path: Path, n: int = 240) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b, v = rng.choice(NAMES), rng.choice(NAMES), rng.choice(VERBS)
            msgs = [{"role": "user", "content": f"What does {a} do?"}, {"role": "assistant", "content": f"{a.capitalize()} {v} {b}."}]
            if i % 3 == 0:
                msgs = [{"role": "system", "content": "Answer briefly."}, *msgs,
                        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": f"Then {b} {v} {a}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    assert main(["prepare", "--source", str(write_chat(root / "chat.jsonl")), "--out", str(root / "data"), "--vocab-size", "320"]) == 0
    return root / "data"


def test_default_chat_template_is_saved_with_trained_tokenizers(tmp_path):
    from transformers import AutoTokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of the play"}) + "\n" for i in range(50)))
    assert main(["tokenizer", str(corpus), str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        "<|bos|><|system|>\nBe brief.<|eos|><|user|>\nHi<|eos|><|assistant|>\nHello.<|eos|>"
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith("Hi<|eos|><|assistant|>\n")
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 3


def test_chat_data_masks_exactly_the_assistant_replies(chat_data):
    from transformers import AutoTokenizer

    from wiola.train import batches

    manifest = json.loads((chat_data / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(chat_data / "tokenizer")
    tokens = np.fromfile(chat_data / "train.bin", dtype=manifest["dtype"]).astype(np.int64)
    mask = np.fromfile(chat_data / "train.mask.bin", dtype=np.uint8)
    assert len(mask) == len(tokens) == manifest["splits"]["train"]["num_tokens"]
    # the masked tokens spell the replies, each closed by eos, and nothing of the prompts
    replies = tok.decode(tokens[mask == 1]).split("<|eos|>")
    assert replies[-1] == "" and all(r.endswith(".") and "<|" not in r and "?" not in r for r in replies[:-1])
    val_tokens = np.fromfile(chat_data / "val.bin", dtype=manifest["dtype"]).astype(np.int64)
    val_replies = tok.decode(val_tokens[np.fromfile(chat_data / "val.mask.bin", dtype=np.uint8) == 1]).split("<|eos|>")
    assert len(replies) - 1 + len(val_replies) - 1 == 240 + 80  # every assistant message, once
    assert int(mask.sum()) == manifest["splits"]["train"]["num_loss_tokens"]
    assert "What does" in tok.decode(tokens[mask == 0]) and "<|assistant|>" in tok.decode(tokens[mask == 0])
    # training batches: labels are -100 exactly where the label token is outside a reply
    sampler = batches.train_sampler(chat_data, batch_size=4, seq_len=32, seed=3, rank=0, world_size=1)
    offsets = sampler.global_offsets(0)
    inputs, labels = next(sampler)
    for row, start in enumerate(offsets):
        window = tokens[start:start + 33]
        assert inputs[row].tolist() == window[:-1].tolist()
        expected = np.where(mask[start + 1:start + 33] == 1, window[1:], -100)
        assert labels[row].tolist() == expected.tolist()
    assert sampler.state_dict()["step"] == 1
    # validation batches are masked the same way; the loss skips -100 and a batch without labels gives 0
    v_labels = torch.cat([labels for _, labels in batches.eval_batches(chat_data, "val", batch_size=4, seq_len=16, max_batches=3)])
    val_mask = np.fromfile(chat_data / "val.mask.bin", dtype=np.uint8)
    assert (v_labels != -100).flatten().tolist() == [bool(val_mask[16 * w + 1 + t]) for w in range(12) for t in range(16)]
    logits = torch.randn(12, 16, 320)
    assert batches.causal_lm_loss(logits, torch.full((12, 16), -100)).item() == 0.0
    keep = v_labels != -100
    assert batches.causal_lm_loss(logits, v_labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[keep], v_labels[keep]).item(), rel=1e-6)


def test_chat_data_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    assert main(["prepare", "--source", str(bad), "--out", str(tmp_path / "o"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: the conversation has no assistant message" in err and len(err.strip().splitlines()) == 1
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    assert main(["prepare", "--source", str(bad), "--out", str(tmp_path / "o"), "--vocab-size", "300"]) == 2
    assert 'bad.jsonl:1: every message needs string "role" and "content"' in capsys.readouterr().err


def _read_until(fd: int, needle: bytes, seen: bytearray, start: int = 0, timeout: float = 60.0) -> None:
    """Read the terminal into `seen` until `needle` shows up after position `start`."""
    deadline = time.monotonic() + timeout
    while needle not in seen[start:]:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {needle!r}; got {bytes(seen)[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"the chat ended before {needle!r}; got {bytes(seen)[-500:]!r}"
            seen += chunk


def test_lora_chat_journey_through_the_cli_and_a_pseudo_terminal(chat_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wiola.decode import StaticDecoder
    from wiola.finetune import load_lora_model

    config = write_model_config(tmp_path / "tiny.json")
    base, lora, merged = tmp_path / "base", tmp_path / "lora", tmp_path / "merged"
    assert main(["train", str(config), str(chat_data), str(base), *FAST, "--max-steps", "60", "--eval-every", "60"]) == 0
    assert main(["train", str(base), str(chat_data), str(lora), *FAST, "--max-steps", "10", "--eval-every", "10",
                 "--init-from", str(base), "--lora", "--lora-rank", "4"]) == 0
    assert train_losses(lora)[1] < train_losses(base)[1] - 1.0  # starts from the base, not from scratch
    assert main(["merge", str(lora), str(merged)]) == 0
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        in_memory = load_lora_model(lora)[0].merge_and_unload()(input_ids=ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits, in_memory)

    # the replies the chat must show: greedy decoding of the templated conversation
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    decoder = StaticDecoder(model, max_cache_len=model.config.max_position_embeddings)

    def reply(messages):
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
        out = decoder.generate(prompt, max_new_tokens=12, eos_token_id=tok.eos_token_id)
        return tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()

    q1, q2 = "What does the king do?", "And then?"
    first = reply([{"role": "user", "content": q1}])
    second = reply([{"role": "user", "content": q1}, {"role": "assistant", "content": first}, {"role": "user", "content": q2}])
    assert first

    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "wiola", "chat", str(merged), "--greedy", "--device", "cpu", "--max-new-tokens", "12"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, b"you> ", seen)
        for question, answer in ((q1, first), (q2, second)):
            os.write(master, question.encode() + b"\n")
            start = len(seen)
            _read_until(master, b"you> ", seen, start)
            shown = bytes(seen[start:]).decode().replace("\r\n", "\n")
            assert f"bot> {answer}" in shown, (shown, answer)
        os.write(master, b"/reset\n")
        _read_until(master, b"(conversation cleared)\r\nyou> ", seen, len(seen))
        os.write(master, q1.encode() + b"\n")
        start = len(seen)
        _read_until(master, b"you> ", seen, start)
        assert f"bot> {first}" in bytes(seen[start:]).decode().replace("\r\n", "\n")  # after /reset: the first answer again
        os.write(master, b"\x04")  # Ctrl-D ends the chat
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
