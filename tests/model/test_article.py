"""The article's components (docs/architecture.md §6.1–6.3): AGU, F3N and HLN reduce to LLaMA exactly at their neutral
settings, and each does what its definition says — against LLaMA, against explicitly sliced SwiGLUs and
against a direct (loop) computation of the hierarchical statistics. The model-suite invariants (cache,
padding, causality, static cache, beams, compile) run on them through `conftest.ARTICLE_COMBOS` and the
`article` generation variant."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wiola import WiolaCache, WiolaForCausalLM

from .conftest import build, random_ids, randomize, tiny_config

SHAPE = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, rms_norm_eps=1e-6, tie_word_embeddings=True)
NEW_PARAMS = {"mlp=agu": ("threshold_proj", "threshold_scale"), "f3n_gate=agu": ("threshold_proj", "threshold_scale"), "norm=hln": (".mix",)}


@pytest.mark.parametrize("overrides", [dict(mlp="agu"), dict(mlp="f3n"), dict(mlp="f3n", f3n_gate="agu"), dict(norm="hln"),
                                       dict(mlp="f3n", f3n_gate="agu", norm="hln")], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_neutral_setting_is_llama(overrides):
    """A LlamaForCausalLM state dict plus the new parameters at their init values gives LLaMA's logits."""
    torch.manual_seed(0)
    llama = randomize(LlamaForCausalLM(LlamaConfig(**SHAPE)).eval())
    model = WiolaForCausalLM(tiny_config(**SHAPE, **overrides)).eval()
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    new = [p for k, v in overrides.items() for p in NEW_PARAMS.get(f"{k}={v}", ())]
    assert not unexpected and bool(missing) == bool(new) and all(any(n in key for n in new) for key in missing), missing
    ids = random_ids(2, 17)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    # float32 rounding: ≤1e-6 on torch 2.13, up to 1.8e-6 on torch 2.6's kernels (docs/compat.md)
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=5e-6, rtol=0)
    got, want = model(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=5e-6, rtol=0)


def _sequence(ids, mask, model, steps=6):
    """Prompt then `steps` greedy single-token steps; the logits of every step."""
    cache, out = WiolaCache(model.config), []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits
        out.append(logits)
        for _ in range(steps):
            token = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits = model(token, attention_mask=mask, past_key_values=cache).logits
            out.append(logits)
    return out


@pytest.mark.parametrize("overrides", [dict(mlp="agu"), dict(mlp="f3n", f3n_gate="agu", f3n_levels=3, f3n_level=2)], ids=["agu", "f3n-agu"])
def test_agu_sparse_decode_equals_dense(overrides):
    model = build(agu_sparse_decode=True, **overrides)
    ids = random_ids(1, 7)
    mask = torch.ones_like(ids)
    sparse = _sequence(ids, mask, model)
    out = model(ids)
    assert all(0.05 < float(v) < 0.95 for v in out.activation_sparsity.values()), out.activation_sparsity
    for module in model.modules():
        if hasattr(module, "sparse_decode"):
            module.sparse_decode = False
    dense = _sequence(ids, mask, model)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_agu_threshold_zeroes_below_tau_and_learns_from_zero():
    model = WiolaForCausalLM(tiny_config(**SHAPE, mlp="agu")).train()
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    assert all(float(v) == 0.0 for v in out.activation_sparsity.values())  # β = 0: nothing thresholded
    out.loss.backward()
    assert all(m.mlp.threshold.threshold_scale.grad.abs().item() > 0 for m in model.model.layers)  # β learns from 0
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, SHAPE["hidden_size"])
    with torch.no_grad():
        mlp.threshold.threshold_scale.fill_(0.02)
        h = torch.nn.functional.silu(mlp.gate_proj(x))
        tau = 0.02 * torch.sigmoid(mlp.threshold.threshold_proj(x))
        expected = torch.where(h.abs() <= tau, torch.zeros_like(h), h - tau * torch.sign(h))
        torch.testing.assert_close(mlp.threshold(x, h), expected, atol=1e-7, rtol=0)


def test_agu_l1_penalty_enters_the_loss():
    model = build(mlp="agu", agu_l1=0.01).train()
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61).float(), ids[:, 1:].reshape(-1))
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, plain + out.aux_loss, atol=1e-6, rtol=0)
    assert model.eval()(ids, labels=ids).aux_loss is None  # a training-only penalty


def test_activation_sparsity_counts_real_tokens_only():
    model = build(mlp="agu")
    row = random_ids(1, 9)
    alone = model(row).activation_sparsity
    ids = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(row)], dim=1)
    padded = model(ids, attention_mask=mask).activation_sparsity
    for i in alone:
        torch.testing.assert_close(padded[i], alone[i], atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_f3n_level_is_the_sliced_swiglu(level):
    """FFN_g = W_down[:, :m_g](SiLU(W_gate[:m_g] x) ⊙ W_up[:m_g] x): a SwiGLU of width m_g with the sliced weights."""
    f3n = build(mlp="f3n", f3n_levels=3, f3n_level=level, intermediate_size=64)
    m = f3n.config.f3n_widths()[level - 1]
    assert f3n.config.f3n_widths() == [16, 32, 64]
    swiglu = WiolaForCausalLM(tiny_config(intermediate_size=m)).eval()
    state = f3n.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("gate_proj.weight", "up_proj.weight")):
            state[key] = value[:m]
        elif key.endswith("down_proj.weight"):
            state[key] = value[:, :m]
    swiglu.load_state_dict(state, strict=True)
    ids = random_ids(2, 11)
    torch.testing.assert_close(f3n(ids).logits, swiglu(ids).logits, atol=1e-6, rtol=0)


def test_f3n_training_masks_equal_the_sliced_levels():
    """A training forward at drawn levels (masked units) computes what inference at those levels (sliced) does."""
    model = build(mlp="f3n", f3n_levels=3, f3n_sampling="layer", intermediate_size=64)
    ids = random_ids(2, 10)
    model.train()
    torch.manual_seed(5)
    out = model(ids)
    levels = out.f3n_levels.tolist()
    assert len(levels) == 6 and all(1 <= v <= 3 for v in levels) and len(set(levels)) > 1
    torch.manual_seed(5)
    assert model(ids).f3n_levels.tolist() == levels  # draws come from the seeded torch RNG
    model.eval()
    for layer, level in zip(model.model.layers, levels):
        layer.mlp.set_level(level)
    torch.testing.assert_close(out.logits, model(ids).logits, atol=1e-5, rtol=0)


def test_f3n_step_sampling_draws_one_level_for_all_layers():
    model = build(mlp="f3n", f3n_levels=3, f3n_sampling="step", intermediate_size=64).train()
    draws = {tuple(model(random_ids(1, 5)).f3n_levels.tolist()) for _ in range(12)}
    assert all(len(set(d)) == 1 for d in draws) and len(draws) > 1


def test_f3n_training_with_sampling_is_causal():
    model = build(mlp="f3n", f3n_gate="agu", f3n_levels=3, f3n_sampling="layer", norm="hln", intermediate_size=64).train()
    ids = random_ids(1, 12)
    torch.manual_seed(1)
    base = model(ids).logits
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 7) % 58 + 3
    torch.manual_seed(1)
    other = model(changed).logits
    torch.testing.assert_close(other[:, :6], base[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(other[:, 6], base[:, 6])


def _hln_reference(norm, x, real):
    """HLN by its definition, token by token in a loop (docs/architecture.md §6.3)."""
    b, t, d = x.shape
    g = norm.groups
    a = norm.mix.detach().clamp(0, 1)
    a = a / a.sum().clamp(min=1)
    out = torch.zeros_like(x)
    for i in range(b):
        total, count = 0.0, 0
        for j in range(t):
            r = (x[i, j] ** 2).mean()
            if real[i, j]:
                total, count = total + r, count + 1
            s = total / max(count, 1)
            rk = (x[i, j].view(g, -1) ** 2).mean(-1).repeat_interleave(d // g)
            v = (1 - a[0] - a[1]) * r + a[0] * rk + a[1] * s
            out[i, j] = norm.weight.detach() * x[i, j] / torch.sqrt(v + norm.variance_epsilon)
    return out


def test_hln_matches_its_definition_with_padding_and_cache():
    model = build(norm="hln")
    norm = model.model.layers[1].input_layernorm
    captured = {}
    norm.register_forward_hook(lambda mod, args, out: captured.setdefault("io", []).append((args[0].detach(), out.detach())))
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        cache = WiolaCache(model.config)
        model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache)
        model(ids[:, 6:], attention_mask=mask, past_key_values=cache)
    x = torch.cat([captured["io"][0][0], captured["io"][1][0]], dim=1)
    y = torch.cat([captured["io"][0][1], captured["io"][1][1]], dim=1)
    want = _hln_reference(norm, x, mask.bool())
    torch.testing.assert_close(y[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_hln_mix_learns_from_zero_and_stays_in_range():
    model = WiolaForCausalLM(tiny_config(**SHAPE, norm="hln")).train()
    ids = random_ids(2, 12)
    model(ids, labels=ids).loss.backward()
    grads = torch.stack([m.mix.grad for m in model.modules() if hasattr(m, "mix")])
    assert grads.shape == (2 * 3 + 1, 2) and (grads.abs() > 0).any(dim=0).all()
    norm = model.model.norm
    with torch.no_grad():
        norm.mix.copy_(torch.tensor([0.9, 0.8]))
    a_k, a_s = norm.mixing()
    assert a_k >= 0 and a_s >= 0 and abs(float((a_k + a_s).detach()) - 1.0) < 1e-6
    with torch.no_grad():
        norm.mix.copy_(torch.tensor([-0.5, 0.3]))
    assert norm.mixing()[0] == 0 and abs(float(norm.mixing()[1].detach()) - 0.3) < 1e-7


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 7), reason="torch 2.6 dynamo")
def test_f3n_sampled_training_step_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build(mlp="f3n", f3n_gate="agu", f3n_levels=3, f3n_sampling="layer", agu_l1=0.01, norm="hln", intermediate_size=64, num_hidden_layers=2).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = random_ids(2, 12)
    for _ in range(2):  # new levels, same graph
        compiled(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch._dynamo.reset()
