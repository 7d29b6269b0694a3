"""What transformers 5.25 changed under Wiola: the `recurrent_states_to_keep` keyword of the cache's
past-recording hook (assisted and prompt-lookup decoding), and Hub kernels on by default in
`from_pretrained` (the `kernels` package imported by every load; a download from huggingface.co for a layer
with a Hub kernel for the device). Wiola's loaders keep the behaviour of 5.0 – 5.24: no kernels, no network.
The loads run in fresh processes, because the `kernels` package and the socket guard are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.serve.tinymodels import save_tiny_model, tiny_tokenizer
from wiola import WiolaCache

from .model.conftest import build, random_ids

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
ENV.pop("HF_HUB_OFFLINE", None)  # the guard below, not the Hub client's offline switch, must be what stops a request
ENV.pop("USE_HUB_KERNELS", None)  # transformers' default (on in 5.25)


def test_past_recording_accepts_the_5_25_keyword():
    """transformers 5.25 calls `activate_past_recording(recurrent_states_to_keep=n)`; the cache then keeps the
    history since the last crop, so a crop of the draft tokens restores the state exactly."""
    model = build(position_encoding="srpe", cross_layer_context="gcla", token_merging="atm", atm_threshold=-1.0)
    ids = random_ids(1, 9)
    cache = WiolaCache(model.config)
    model(ids[:, :5], cache=cache)
    cache.activate_past_recording(recurrent_states_to_keep=4)
    assert cache.record_past
    model(ids[:, 5:], cache=cache)  # four draft tokens
    cache.crop(-3)  # three rejected
    fresh = WiolaCache(model.config)
    model(ids[:, :6], cache=fresh)
    probe = random_ids(1, 1, seed=3)
    torch.testing.assert_close(model(probe, cache=cache).logits, model(probe, cache=fresh).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny Wiola checkpoint and a tiny HF LLaMA one (its RMSNorm is a layer that Hub kernels replace)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("kernels")
    tok = tiny_tokenizer()
    wiola_dir = save_tiny_model(root / "wiola", "paper", tok)
    llama_dir = root / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(llama_dir)
    tok.save_pretrained(llama_dir)
    return {"wiola": wiola_dir, "llama": llama_dir}


LOAD = """
from wiola.train.checkpoint import load_for_inference
model, tok, _ = load_for_inference({path!r}, "cpu")
model.train(); model.eval()  # transformers 5.25 re-kernelizes on a change of mode
ids = torch.tensor([tok("the king").input_ids])
assert torch.isfinite(model(ids).logits).all()
"""


def _run(*pieces: str) -> dict:
    """Run the pieces of a script (each dedented) in a fresh interpreter; its last stdout line is JSON."""
    script = "\n".join(textwrap.dedent(piece) for piece in pieces)
    res = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["wiola", "llama"])
def test_loading_needs_no_kernels_package(model_dirs, kind):
    """transformers 5.25 lists `kernels` as a dependency, but an environment without it (a `--no-deps`
    install, a trimmed image) still loads Wiola checkpoints and LLaMA exports."""
    seen = _run("""
        import json, sys
        sys.modules["kernels"] = None  # as if the package were not installed: importing it raises ImportError
        import torch
    """, LOAD.format(path=str(model_dirs[kind])), """
        print(json.dumps({"kernels_imported": sys.modules.get("kernels") is not None}))
    """)
    assert seen == {"kernels_imported": False}


@pytest.mark.parametrize("kind", ["wiola", "llama"])
def test_loading_makes_no_network_request(model_dirs, kind):
    """With every socket connection and name lookup refused (recorded), loading a local checkpoint asks
    nothing of the network, even where transformers' kernel mapping names a Hub kernel for the device: here one
    is registered for RMSNorm on the CPU, as 5.25 registers LigerRMSNorm on CUDA (on which a plain
    `from_pretrained` asks huggingface.co for it and, offline, fails)."""
    seen = _run("""
        import json, socket
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(repr(args[1:3] if len(args) > 1 else args))
            raise OSError("network blocked by the test")
        socket.socket.connect = socket.socket.connect_ex = refuse
        socket.getaddrinfo = socket.create_connection = refuse
        import torch
        try:
            import kernels
        except ImportError:  # transformers < 5.25 does not need it
            kernels = None
        if kernels is not None and hasattr(kernels, "register_kernel_mapping"):
            kernels.register_kernel_mapping({"RMSNorm": {"cpu": kernels.LayerRepository(
                repo_id="kernels-community/liger-kernels", layer_name="LigerRMSNorm", version=4)}})
    """, LOAD.format(path=str(model_dirs[kind])), """
        print(json.dumps({"attempts": attempts}))
    """)
    assert seen == {"attempts": []}
