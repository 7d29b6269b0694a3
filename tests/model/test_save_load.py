"""save_pretrained/from_pretrained round trips, Auto classes, and trust_remote_code without the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from wiola import WiolaConfig, WiolaForCausalLM

from .conftest import build, random_ids

PAPER = dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm", token_merging="atm", atm_threshold=0.0)


def test_round_trip_identical_logits(tmp_path):
    for i, overrides in enumerate([dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly"), dict(PAPER, tie_word_embeddings=False)]):
        model = build(**overrides)
        path = tmp_path / f"m{i}"
        model.save_pretrained(path)
        assert (path / "model.safetensors").exists()
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert isinstance(loaded, WiolaForCausalLM)
        drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
        assert drop(loaded.config.to_dict()) == drop(model.config.to_dict())
        ids = random_ids(2, 14)
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert tied == model.config.tie_word_embeddings


def test_auto_config_knows_wiola():
    config = AutoConfig.for_model("wiola", hidden_size=64, num_attention_heads=4)
    assert isinstance(config, WiolaConfig)


def test_trust_remote_code_loads_without_the_package(tmp_path):
    model = build(**PAPER)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_wiola.WiolaForCausalLM"
    ids = random_ids(1, 10)
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["wiola"] = None  # any `import wiola` now fails
        try:
            import wiola
        except ImportError:
            pass
        else:
            raise SystemExit("wiola is importable")
        import torch
        torch.set_num_threads(1)  # as in the test process, so that the sums run in the same order
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
        assert "wiola" not in type(model).__module__.split(".")[0]
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        got = model(ref["ids"]).logits
        assert torch.equal(got, ref["logits"]), f"logits differ by {{(got - ref['logits']).abs().max().item()}}"
        out = model.generate(ref["ids"], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 14)
        print("remote-ok", type(model).__module__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "remote-ok transformers_modules" in res.stdout
