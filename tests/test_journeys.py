"""Whole user journeys, one per model family (seed-style, paper-style with ATM forced on, all-off), through
the CLI where it exists:

prepare → train → SIGINT → --resume (the loss sequence of an uninterrupted run) → eval → greedy decoding
(HF `generate` = `wiola generate`'s decoder = an argmax loop) → `save_pretrained` → `trust_remote_code` load
in a process without the package (same logits) → `wiola convert` of a checkpoint of the family's origin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wiola.cli import main

from .train.tinyrun import FAMILIES, FAST, corpus, read_log, train_losses

SRC = Path(__file__).resolve().parents[1] / "src"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
MODEL = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 48, "max_position_embeddings": 96}
STEPS = 40
RUN = [*FAST, "--max-steps", str(STEPS), "--eval-every", "20", "--save-every", "1000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """`wiola prepare` on a small corpus, through the CLI."""
    root = tmp_path_factory.mktemp("journey")
    source = root / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in corpus(400, 3)), encoding="utf-8")
    out = root / "data"
    assert main(["prepare", "--source", str(source), "--out", str(out), "--vocab-size", "320", "--num-workers", "1"]) == 0
    assert (out / "manifest.json").is_file()
    return out


def _interrupted_run(cfg: Path, data: Path, out: Path) -> int:
    """`wiola train` in a subprocess, stopped by SIGINT after step 3; returns the step it saved at."""
    cmd = [sys.executable, "-m", "wiola", "train", str(cfg), str(data), str(out), *RUN]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, log = time.monotonic() + 180, out / "log.jsonl"
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            if log.is_file() and any(json.loads(line).get("step", 0) >= 3 for line in log.read_text().splitlines() if line.endswith("}")):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    stopped = [r["step"] for r in read_log(out) if r.get("event") == "interrupted"]
    assert len(stopped) == 1 and 3 <= stopped[0] < STEPS
    return stopped[0]


def _argmax_loop(model, ids: torch.Tensor, n: int, eos: int | None) -> list[int]:
    out = ids
    for _ in range(n):
        with torch.no_grad():
            token = model(out, use_cache=False).logits[0, -1].argmax()
        out = torch.cat([out, token.view(1, 1)], dim=1)
        if eos is not None and int(token) == eos:
            break
    return out[0, ids.shape[1]:].tolist()


def _remote_logits(saved: Path, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    """Logits of `saved` loaded with trust_remote_code in a fresh process where `import wiola` fails."""
    torch.save(ids, tmp / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["wiola"] = None
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp / 'ids.pt')!r})).logits, {str(tmp / 'remote.pt')!r})
    """)
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "modules"), PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp / "remote.pt")


def _convert_family_source(family: str, tmp: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A checkpoint of the family's origin and its own logits: the reference packages' fixtures for the
    seed and paper families, a random `LlamaForCausalLM` for all-off."""
    if family == "seed":
        src = FIXTURES / "wiola13m" / "gsa_tied"
    elif family == "paper":
        src = FIXTURES / "wiola" / "gqa2_tied_atm_l6"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)).eval()
        with torch.no_grad():
            for p in llama.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        src = tmp / "llama"
        llama.save_pretrained(src)
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return src, ids, llama(ids).logits
    ref = load_file(str(src / "reference.safetensors"))
    return src, ref["input_ids"], ref["logits"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_user_journey(family, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({**MODEL, **FAMILIES[family]}))

    # 1-2. train uninterrupted; train, SIGINT, --resume: the same losses, step for step
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["train", str(cfg), str(data), str(whole), *RUN]) == 0
    stopped = _interrupted_run(cfg, data, resumed)
    assert main(["train", str(cfg), str(data), str(resumed), "--resume"]) == 0
    a, b = train_losses(whole), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), stopped
    assert a == b, [(k, a[k], b[k]) for k in a if a[k] != b[k]][:3]
    val = lambda out: [(r["step"], r["val_loss"]) for r in read_log(out) if "val_loss" in r]  # noqa: E731
    assert val(whole) == val(resumed) and len(val(whole)) == 2

    # 3. eval: both runs' models score the same
    capsys.readouterr()
    assert main(["eval", str(whole), str(data), "--json"]) == 0
    ev_whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(resumed), str(data), "--json"]) == 0
    ev_resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev_whole["loss"] == ev_resumed["loss"] and 0 < ev_whole["loss"] < 6

    # 4. greedy: HF generate = `wiola generate` (static decoder) = an argmax loop without a cache
    model = AutoModelForCausalLM.from_pretrained(resumed).eval()
    tokenizer = AutoTokenizer.from_pretrained(resumed)
    prompt = "The king speaks to"
    ids = torch.tensor([tokenizer.encode(prompt)])
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(hf) >= 1
    assert _argmax_loop(model, ids, 12, eos) == hf
    assert main(["generate", str(resumed), prompt, "--greedy", "--max-new-tokens", "12", "--no-stream", "--device", "cpu",
                 "--decoding", "static"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == tokenizer.decode(ids[0].tolist() + hf, skip_special_tokens=True).strip()

    # 5. save_pretrained, then a trust_remote_code load in a process without the package: the same logits
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    with torch.no_grad():
        local = model(ids).logits
    assert torch.equal(_remote_logits(saved, ids, tmp_path), local)

    # 6. wiola convert of a checkpoint of the family's origin: its own logits
    src, ref_ids, ref_logits = _convert_family_source(family, tmp_path)
    assert main(["convert", str(src), str(tmp_path / "converted")]) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ref_ids, use_cache=False).logits, ref_logits, atol=1e-4, rtol=0)
