"""No warning from our code paths on the installed transformers: `wiola eval`, `wiola generate` (both
decoders) and `model.generate` (greedy, sampling, beams, left-padded batches, static cache, prompt lookup), each in a fresh
process, because transformers prints most deprecations once per process through its logger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.train.tinyrun import FAMILIES, FAST, make_dataset, write_model_config
from wiola.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
# the CLI runs with Python's default warning filters, as a user's shell has them (FutureWarning shown,
# DeprecationWarning from libraries hidden); transformers' own deprecation notes go through its logger
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
PAPER = FAMILIES["paper"]


def _noise(stderr: str) -> list[str]:
    """Lines of stderr that warn (progress bars and our own notes are not warnings)."""
    return [line for line in stderr.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("warn")
    data = make_dataset(root / "data")
    out = root / "run"
    assert main(["train", str(write_model_config(root / "m.json", **PAPER)), str(data), str(out), *FAST,
                 "--max-steps", "3", "--eval-every", "100"]) == 0
    return out, data


@pytest.mark.parametrize("argv", [
    ["eval", "{run}", "{data}"],
    ["generate", "{run}", "the king", "--greedy", "--max-new-tokens", "8", "--device", "cpu", "--decoding", "static"],
    ["generate", "{run}", "the king", "--max-new-tokens", "8", "--device", "cpu", "--decoding", "generate"],
], ids=["eval", "generate-static", "generate-hf"])
def test_cli_prints_no_warning(trained, argv):
    run, data = trained
    cmd = [sys.executable, "-m", "wiola", *(a.format(run=run, data=data) for a in argv)]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _noise(res.stderr) == [], res.stderr[-3000:]


def test_model_generate_paths_warn_nothing(trained, tmp_path):
    run, _ = trained
    script = textwrap.dedent(f"""
        import io, json, logging, warnings
        warnings.simplefilter("always")
        buf = io.StringIO()
        logging.getLogger("transformers").addHandler(logging.StreamHandler(buf))
        import torch
        import wiola
        from transformers import AutoModelForCausalLM
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained({str(run)!r}).eval()
            ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            mask[1, :2] = 0
            gen = dict(max_new_tokens=5, pad_token_id=0)
            model.generate(ids, attention_mask=mask, do_sample=False, **gen)
            model.generate(ids, attention_mask=mask, do_sample=True, top_k=5, **gen)
            model.generate(ids, attention_mask=mask, num_beams=2, do_sample=False, **gen)
            model.generate(ids, attention_mask=mask, do_sample=False, cache_implementation="static", **gen)
            model.generate(ids[:1], do_sample=False, prompt_lookup_num_tokens=2, **gen)  # crops (5.25: new hook keyword)
            out = model(ids, attention_mask=mask, use_cache=True)
            model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=getattr(out, wiola.compat_wiola.CACHE_KWARG))
        print(json.dumps({{"log": buf.getvalue(), "warnings": [f"{{w.category.__name__}}: {{w.message}}" for w in caught]}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert _noise(seen["log"]) == [], seen["log"]
    # torch's own UserWarnings (e.g. flex attention on CPU) are not ours; deprecations are
    assert [w for w in seen["warnings"] if "Deprecat" in w or "FutureWarning" in w] == []
