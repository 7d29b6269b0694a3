"""WiolaForCausalLM against LLaMA, across every component combination: exact reductions, cache
consistency, causality, padding invariance, SDPA vs eager, autocast, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from wiola.compat_wiola import enable_checkpointing, output_cache
from transformers import LlamaConfig, LlamaForCausalLM

from wiola import WiolaForCausalLM

from .conftest import build, random_ids, randomize, tiny_config

ATM = dict(token_merging="atm", atm_threshold=-1.0)  # threshold −1: every other edge merges


def chunked_logits(model, ids, chunks, attention_mask=None):
    """Run `ids` through the cache in chunks of the given sizes and concatenate the logits."""
    cache, out, start = None, [], 0
    for size in chunks:
        end = start + size
        mask = None if attention_mask is None else attention_mask[:, :end]
        o = model(ids[:, start:end], attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = output_cache(o)
        out.append(o.logits)
        start = end
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("tied", [True, False])
def test_llama_state_dict_loads_strict_and_matches(tied):
    kw = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    randomize(llama)
    model = WiolaForCausalLM(tiny_config(**kw)).eval()
    model.load_state_dict(llama.state_dict(), strict=True)
    ids = random_ids(2, 17)
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    got, want = model(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pair", [
    (dict(position_encoding="spiral", spiral_alpha=0.0), dict(position_encoding="rope")),
    (dict(norm="wiola_rmsnorm"), dict(norm="rmsnorm")),
])
def test_exact_reductions(pair):
    """spiral with α=0 is rope, wiola_rmsnorm with δ=0 is rmsnorm — bit for bit."""
    a, b = build(**pair[0]), build(**pair[1])
    state = a.state_dict()
    with torch.no_grad():
        for name, p in a.named_parameters():
            if name.endswith(".offset"):
                p.zero_()
    state = {k: v for k, v in a.state_dict().items() if not k.endswith(".offset")}
    b.load_state_dict(state, strict=True)
    ids = random_ids(2, 20)
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("merging", [False, True], ids=["plain", "atm"])
def test_full_chunked_and_stepwise_agree(combo, merging):
    model = build(**combo, **(ATM if merging else {}))
    ids = random_ids(2, 13)
    full = model(ids, use_cache=False).logits
    chunked, _ = chunked_logits(model, ids, [5, 3, 5])
    stepwise, cache = chunked_logits(model, ids, [1] * 13)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(stepwise, full, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 13


@pytest.mark.parametrize("merging", [False, True], ids=["plain", "atm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_strict_causality(combo, merging, mode):
    model = build(**combo, **(ATM if merging else {}))
    model.train(mode == "train")
    ids = random_ids(1, 12)
    base = model(ids, use_cache=False).logits
    for t in (4, 11):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 7) % 58 + 3
        other = model(changed, use_cache=False).logits
        torch.testing.assert_close(other[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(other[:, t], base[:, t])


@pytest.mark.parametrize("merging", [False, True], ids=["plain", "atm"])
def test_padding_invariance(combo, merging):
    model = build(**combo, **(ATM if merging else {}))
    rows = [random_ids(1, n, seed=n)[0] for n in (11, 6, 9)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batched = model(ids, attention_mask=mask).logits
    stepped, _ = chunked_logits(model, ids, [4, 1, 1, 5], attention_mask=mask)
    for i, r in enumerate(rows):
        alone = model(r[None]).logits[0]
        torch.testing.assert_close(batched[i, width - len(r):], alone, atol=1e-4, rtol=0)
        torch.testing.assert_close(stepped[i, width - len(r):], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides", [dict(), dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly"),
                                       dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm", **ATM),
                                       dict(attention_gate="gsa", gate_pre_rope=False, cross_layer_context="gcla", token_merging="atm", atm_threshold=0.1),
                                       dict(position_encoding="srpe", cross_layer_context="gcla", mlp="f3n", f3n_gate="agu", f3n_levels=3, f3n_level=2, norm="hln", **ATM)])
def test_sdpa_matches_eager(overrides):
    sdpa = build(**overrides)
    eager = build(**overrides)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids = random_ids(2, 15)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    torch.testing.assert_close(sdpa(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, atol=1e-5, rtol=0)


def test_bf16_autocast_runs_on_cpu():
    model = build(position_encoding="srpe", attention_gate="gsa", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm", **ATM)
    ids = random_ids(2, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    ref = model(ids).logits
    assert (out.logits.float() - ref).abs().max() < 0.25


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("overrides", [dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly"),
                                       dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm", **ATM),
                                       dict()], ids=["seed", "paper", "all-off"])
def test_gradient_checkpointing_same_gradients(overrides, reentrant):
    ids = random_ids(2, 12)
    grads = []
    for checkpointing in (False, True):
        model = build(**overrides).train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant=reentrant)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > len(list(model.parameters())) // 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_output_hidden_states_and_loss():
    model = build(cross_layer_context="gcla")
    ids = random_ids(2, 9)
    out = model(ids, labels=ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_dropout_active_only_in_training():
    model = build(hidden_dropout=0.3, attention_dropout=0.3)
    ids = random_ids(1, 10)
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_output_attentions_is_refused_clearly():
    model = build()
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(random_ids(1, 5), output_attentions=True)
