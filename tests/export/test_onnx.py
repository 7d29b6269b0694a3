"""`wiola export --to onnx`: the step graph under onnxruntime decodes the tokens PyTorch decodes, for the
seed-style, paper-style (ATM forced on) and all-off families; the step function itself (in PyTorch) computes
what the cached forward computes, with partial merging too."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from tests.export.conftest import save_model
from tests.train.tinyrun import FAMILIES
from wiola import WiolaForCausalLM
from wiola.cli import main
from wiola.export.onnx_step import OnnxStep, empty_state

NEW = 64
STATE_TOLERANCE = 1e-4  # logits after 64 steps of fp32 state, onnxruntime vs PyTorch (seen: ~1e-5)


def prompts(vocab: int = 40):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # row 0 is left-padded
    return ids, mask


def reference(model, ids, mask, new=NEW):
    """PyTorch's greedy tokens (no end-of-sequence stop) and the logits of each generated position."""
    model.generation_config.eos_token_id = None  # (generate fills an unset eos_token_id from the model's config)
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=config, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnxruntime_decodes_pytorchs_greedy_tokens(exports, family):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed (wiola[export]): ONNX export not tested")
    from wiola.export.onnx_run import OnnxStepSession, onnx_generate

    src, out = exports(family)
    model = WiolaForCausalLM.from_pretrained(src).eval()
    ids, mask = prompts()
    expected, expected_logits = reference(model, ids, mask)
    session = OnnxStepSession(out, threads=1)
    tokens, logits = onnx_generate(session, ids.numpy(), mask.numpy(), max_new_tokens=NEW, return_logits=True)
    assert tokens.tolist() == expected.tolist()
    assert np.abs(logits - expected_logits.numpy()).max() <= STATE_TOLERANCE
    assert len(set(tokens[0].tolist())) > 3  # a real sequence, not one token repeated

    # the same graph continues a state chunk by chunk (1, 2, then 8 tokens): the prompt's last logits agree
    state = session.empty_state(2, ids.shape[1])
    for lo, hi in ((0, 1), (1, 3), (3, ids.shape[1])):
        chunk_logits, state = session(ids[:, lo:hi].numpy(), mask[:, lo:hi].numpy(), state)
    assert np.abs(chunk_logits[:, -1] - expected_logits[:, 0].numpy()).max() <= STATE_TOLERANCE

    meta = json.loads((out / "wiola_onnx.json").read_text())
    names = {s["name"] for s in meta["state"]}
    config = model.config
    assert {"position", "key_real", "real_count", "0.keys", "0.values"} <= names
    assert ("0.gsa_sum" in names) == (config.attention_gate == "gsa")
    assert ("0.out_sum" in names) == (config.cross_layer_context == "gcla")
    for i in config.merge_layers:
        assert {f"{i}.lengths", f"{i}.last_x", f"{i}.last_real", f"{i}.last_taken"} <= names
    if config.merge_layers:  # ATM forced on: the exported state really holds fewer groups than tokens
        state = session.empty_state(2, ids.shape[1])
        _, state = session(ids.numpy(), mask.numpy(), state)
        lengths = dict(zip([s["name"] for s in meta["state"]], state))[f"{config.merge_layers[0]}.lengths"]
        assert (lengths < mask.sum(1).numpy()).all()


@pytest.mark.parametrize("threshold", [-1.0, 0.3])
def test_step_function_equals_cached_forward(char_tokenizer, tmp_path, threshold):
    """In PyTorch, no export: the fixed-capacity step (prompt, then chunks of 2 and single tokens) against the
    cached forward, with merging forced on and partial."""
    model = WiolaForCausalLM.from_pretrained(save_model(tmp_path, char_tokenizer, "paper", atm_threshold=threshold)).eval()
    ids, mask = prompts()
    expected, expected_logits = reference(model, ids, mask, new=12)
    step = OnnxStep(model)
    state = empty_state(model.config, 2, ids.shape[1] + 12)
    with torch.no_grad():
        logits, *state = step(ids, mask, *state)
        got = [logits[:, -1]]
        fed = expected[:, :2]  # a chunk of two known tokens, then one token per step
        logits, *state = step(fed, torch.ones_like(fed), *state)
        got += [logits[:, 0], logits[:, 1]]
        for i in range(2, 11):
            logits, *state = step(expected[:, i:i + 1], torch.ones(2, 1, dtype=torch.long), *state)
            got.append(logits[:, 0])
    assert (torch.stack(got, 1) - expected_logits[:, :12]).abs().max() <= 5e-5  # logits of size ~5: float rounding
    merged = dict(zip([s.name for s in step.spec], state))["1.lengths"]
    total = mask.sum(1) + 11
    assert (merged < total).all() and (threshold == -1.0 or (merged > total // 2 + 1).all())


def test_missing_onnx_packages_are_one_line(tmp_path, char_tokenizer, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    src = save_model(tmp_path / "model", char_tokenizer, "all-off")
    assert main(["export", str(src), str(tmp_path / "out"), "--to", "onnx"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "wiola export: error: wiola export --to onnx needs onnxruntime: pip install 'wiola[export]'"


def test_runner_stops_at_eos_like_generate_and_decodes_text(exports):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed (wiola[export]): ONNX export not tested")
    from wiola.export.onnx_run import OnnxStepSession, onnx_generate, onnx_generate_text

    src, out = exports("all-off")
    model = WiolaForCausalLM.from_pretrained(src).eval()
    ids, mask = prompts()
    free, _ = reference(model, ids, mask, new=12)
    eos = int(free[0, 3])  # row 0 ends at its 4th token; row 1 ends where (if) it produces that token
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=2)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    session = OnnxStepSession(out)
    assert onnx_generate(session, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=2).tolist() == expected.tolist()
    with pytest.raises(ValueError, match="exceed the model's context"):
        onnx_generate(session, ids, mask, max_new_tokens=200)
    text = onnx_generate_text(out, "the king", max_new_tokens=5)
    assert text.startswith("the king") and len(text) > len("the king")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_step_graph_has_fused_operators(exports, family):
    """Graph formats 2 and 3: the standard parts run as single onnxruntime kernels (`wiola.export.onnx_fuse`) —
    every `WiolaRMSNorm` as (Skip)SimplifiedLayerNormalization, the plain layers' attention as opset-23 Attention
    reading the cache buffers themselves (GQA without the repeat_kv copies), the rotation as RotaryEmbedding, the
    projections of one input as one MatMul — and nothing of their decomposed forms is left; HLN norms stay
    decomposed. Both bodies of the `If` (`wiola.export.onnx_branch`) are fused; the one-token body rotates q and k
    in one RotaryEmbedding and is the shorter; the weights are stored once. (The decoding test above holds the numbers.)"""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed (wiola[export]): ONNX export not tested")
    import onnx

    from wiola.export.onnx_branch import CHUNK, TOKEN, bodies

    src, out = exports(family)
    model = WiolaForCausalLM.from_pretrained(src)
    config = model.config
    full = onnx.load(str(out / "model.onnx"))
    assert json.loads((out / "wiola_onnx.json").read_text())["format"] == "wiola-onnx-step/3"
    assert [node.op_type for node in full.graph.node][-1] == "If"
    stored = sum(onnx.numpy_helper.to_array(init).nbytes for init in full.graph.initializer)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert params <= stored < 1.2 * params  # once, not once per body (plus small tables and merged copies' slack)
    weights = {init.name for init in full.graph.initializer}
    layers, plain = config.num_hidden_layers, config.num_hidden_layers - len(config.merge_layers if config.atm_threshold < 1.0 else [])
    chunk, token = bodies(full)
    assert len(token.node) < len(chunk.node)
    # one token: ATM layers too attend over their stored groups (store, then attend)
    for graph, prefix, rotations, on_cache in ((chunk, CHUNK, 2 * layers, plain), (token, TOKEN, layers, layers)):
        ops = [node.op_type for node in graph.node]
        norms = ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization")
        assert norms == (0 if config.norm == "hln" else 2 * layers + 1)
        assert "RMSNormalization" not in ops and not graph.initializer
        if config.norm == "rmsnorm":  # (wiola_rmsnorm adds its offset first: no residual to fold in)
            assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
        assert ops.count("RotaryEmbedding") == rotations
        attention = [node for node in graph.node if node.op_type == "Attention"]
        assert len(attention) >= plain and "IsNaN" not in ops
        assert config.num_key_value_heads < config.num_attention_heads
        fed = {f"{prefix}present.{i}.keys" for i in range(layers)} | {f"{prefix}present.{i}.values" for i in range(layers)}
        assert sum(node.input[1] in fed and node.input[2] in fed for node in attention) == on_cache
        # the MatMuls reading one input (q/k/v and GCLA's output gate; an MLP's gate and up) are one MatMul and a Split
        readers = collections.Counter(node.input[0] for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights)
        assert max(readers.values()) == 1 and ops.count("Split") >= layers
