"""docs/architecture.md is the model's math: it covers every component switch and config field, every test
it names exists, and its equations — written out again here from the page, one token at a time, in fp64,
with loops instead of the library's vectorised kernels — give the logits `WiolaForCausalLM` gives."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from wiola import WiolaConfig
from wiola.configuration_wiola import _CHOICES
from wiola.components_wiola import WiolaRotaryEmbedding, apply_rotary

from .model.conftest import build, random_ids

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
NOT_MATH = {"use_cache", "pad_token_id", "bos_token_id", "eos_token_id"}  # config fields that change no equation


# --------------------------------------------------------------------------- coverage of the page


def test_architecture_covers_every_switch_value_and_config_field():
    text = DOC.read_text()
    for field, values in _CHOICES.items():
        assert f"`{field}" in text, field
        for value in values:
            assert f"`{value}`" in text or f"{field} = {value}`" in text, f"{field}={value}"
    for field in WiolaConfig.__annotations__:
        if field not in NOT_MATH:
            assert field in text, f"docs/architecture.md does not mention WiolaConfig.{field}"


def test_architecture_names_only_tests_that_exist():
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", DOC.read_text()))
    assert len(named) > 40
    missing = []
    for path, name in sorted(named):
        source = ROOT / path
        if not source.is_file() or not re.search(rf"^\s*def {name}\(", source.read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/architecture.md names tests that do not exist: {missing}"


# --------------------------------------------------------------------------- the page's equations, again


def _norm(x, p, name, c):
    """§2.1 / §6.3 for a sequence x [T, d] (every token real)."""
    gamma = p[name + ".weight"]
    if c.norm == "hln":
        a = p[name + ".mix"].clamp(0, 1)
        a = a / max(float(a.sum()), 1.0)
        q_tok = (x * x).mean(-1, keepdim=True)  # [T, 1]
        q_grp = (x * x).view(x.shape[0], c.num_attention_heads, -1).mean(-1)  # [T, H]
        s = q_tok.cumsum(0) / torch.arange(1, x.shape[0] + 1, dtype=x.dtype)[:, None]
        v = (1 - a[0] - a[1]) * q_tok + a[0] * q_grp.repeat_interleave(c.head_dim, dim=1) + a[1] * s
        return gamma * x / torch.sqrt(v + c.rms_norm_eps)
    z = x + p[name + ".offset"] if c.norm == "wiola_rmsnorm" else x
    return gamma * z / torch.sqrt((z * z).mean(-1, keepdim=True) + c.rms_norm_eps)


def _tables(c, positions):
    """§2.2: c_j, s_j for each position, [T, d_h/2]."""
    half = c.head_dim // 2
    j = torch.arange(half, dtype=torch.float64)
    omega = c.rope_theta ** (-2 * j / c.head_dim)
    if c.position_encoding == "spiral":
        omega = omega * (1 + c.spiral_alpha * torch.sqrt(j + 1) / math.sqrt(half))
    p = positions[:, None].double()
    if c.position_encoding == "srpe":
        angle = p * omega * (1 + 1 / c.srpe_k)
        radius = 1 + c.srpe_amplitude * torch.sin(c.srpe_frequency * p * omega)
        return radius * torch.cos(angle), radius * torch.sin(angle)
    return torch.cos(p * omega), torch.sin(p * omega)


def _rot(x, cos, sin):
    """rot(x) = [x¹c − x²s ; x²c + x¹s] per head; x [T, heads, d_h], tables [T, d_h/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _gelu(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def _silu(z):
    return z * torch.sigmoid(z)


def _mlp(x, p, pre, c, layer):
    """§2.4 / §6.1 / §6.2 for x [T, d]."""
    w = lambda name: p[pre + name + ".weight"]  # noqa: E731
    if c.mlp == "butterfly":
        ab = x @ w("up_proj").T
        a, b = ab[:, : c.intermediate_size], ab[:, c.intermediate_size:]
        return (_silu(a) * b + x @ w("bypass_proj").T) @ w("down_proj").T
    if c.mlp == "gelu":
        return _gelu(x @ w("up_proj").T) @ w("down_proj").T
    if c.mlp == "dsff":
        a = (_silu(x @ w("gate_proj").T) * (x @ w("up_proj").T)) @ w("down_proj").T
        b = _gelu(x @ w("wide_up_proj").T) @ w("wide_down_proj").T
        alpha = torch.sigmoid(torch.cat([a, b], dim=-1) @ w("fusion_proj").T)
        return alpha * a + (1 - alpha) * b
    m = c.intermediate_size
    if c.mlp == "f3n":  # eval: the level's leading units
        f, g = c.intermediate_size, c.f3n_levels
        widths = [f if k == g else min(f, max(8, 8 * round(f / 2 ** (g - k) / 8))) for k in range(1, g + 1)]
        m = widths[c.f3n_layer_levels()[layer] - 1]
    h = _silu(x @ w("gate_proj")[:m].T)
    if c.mlp == "agu" or (c.mlp == "f3n" and c.f3n_gate == "agu"):
        tau = p[pre + "threshold.threshold_scale"] * torch.sigmoid(x @ w("threshold.threshold_proj").T + p[pre + "threshold.threshold_proj.bias"])
        h = torch.sign(h) * torch.clamp(h.abs() - tau, min=0)
    return (h * (x @ w("up_proj")[:m].T)) @ w("down_proj")[:, :m].T


def _softmax_attend(q, keys, values, d_h):
    scores = torch.stack([q @ k for k in keys]) / math.sqrt(d_h)
    probs = torch.softmax(scores, dim=0)
    return sum(pr * v for pr, v in zip(probs, values))


def reference_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, int]]:
    """docs/architecture.md §1–§2 (and §6.1–6.3), for one unpadded row `ids` [T] in eval mode.
    Returns the logits [T, V] and the number of merged pairs of each ATM layer."""
    c = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    t_len, heads, kv_heads, d_h = ids.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
    rep = heads // kv_heads
    count = torch.arange(1, t_len + 1, dtype=torch.float64)[:, None]  # n_t, every token real
    cos, sin = _tables(c, torch.arange(t_len))
    atm = set(c.merge_layers) if c.atm_threshold < 1 else set()
    x = p["model.embed_tokens.weight"][ids]
    summaries, merges = [], {}
    for layer in range(c.num_hidden_layers):
        pre = f"model.layers.{layer}."
        u = _norm(x, p, pre + "input_layernorm", c)
        proj = lambda name: u @ p[pre + "self_attn." + name + ".weight"].T  # noqa: E731
        q, k, v = proj("q_proj").view(t_len, heads, d_h), proj("k_proj").view(t_len, kv_heads, d_h), proj("v_proj").view(t_len, kv_heads, d_h)
        qr, kr = _rot(q, cos, sin), _rot(k, cos, sin)
        qg = qr
        if c.attention_gate == "gsa":
            m = (q if c.gate_pre_rope else qr).mean(dim=1)  # [T, d_h]
            mean = m.cumsum(0) / count
            g = torch.sigmoid(_silu(mean @ p[pre + "self_attn.gate_fc1.weight"].T) @ p[pre + "self_attn.gate_fc2.weight"].T
                              + p[pre + "self_attn.gate_fc2.bias"])  # [T, H]
            qg = qr * g[:, :, None]
        # which keys/values query t sees, per kv head: plain causal, or ATM's groups
        if layer in atm:
            joins = [False] * t_len
            for t in range(1, t_len):
                rho = torch.nn.functional.cosine_similarity(u[t - 1], u[t], dim=0)
                joins[t] = bool(rho > c.atm_threshold) and not joins[t - 1]
            merges[layer] = sum(joins)
            groups = []  # (end, key [H_kv, d_h], value)
            for s in range(t_len):
                if joins[s]:
                    continue
                if s + 1 < t_len and joins[s + 1]:
                    groups.append((s + 1, (kr[s] + kr[s + 1]) / 2, (v[s] + v[s + 1]) / 2))
                else:
                    groups.append((s, kr[s], v[s]))
            seen = [[(gk, gv) for end, gk, gv in groups if end <= t] + ([(kr[t], v[t])] if t + 1 < t_len and joins[t + 1] else [])
                    for t in range(t_len)]
        else:
            seen = [[(kr[s], v[s]) for s in range(t + 1)] for t in range(t_len)]
        o = torch.stack([torch.stack([_softmax_attend(qg[t, h], [kk[h // rep] for kk, _ in seen[t]], [vv[h // rep] for _, vv in seen[t]], d_h)
                                      for h in range(heads)]) for t in range(t_len)])  # [T, H, d_h]
        if c.cross_layer_context == "gcla":
            if layer > 0:
                context = summaries[max(0, layer - c.gcla_lookback):layer]  # older first
                beta = torch.sigmoid(p[pre + "self_attn.blend_logit"])
                kc = [(mu @ p[pre + "self_attn.k_ctx_proj.weight"].T).view(t_len, kv_heads, d_h) for mu in context]
                vc = [(mu @ p[pre + "self_attn.v_ctx_proj.weight"].T).view(t_len, kv_heads, d_h) for mu in context]
                oc = torch.stack([torch.stack([_softmax_attend(qr[t, h], [kj[t, h // rep] for kj in kc], [vj[t, h // rep] for vj in vc], d_h)
                                               for h in range(heads)]) for t in range(t_len)])
                o = (1 - beta) * o + beta * oc
            z = torch.sigmoid(u @ p[pre + "self_attn.output_gate_proj.weight"].T) * o.reshape(t_len, -1)
        else:
            z = o.reshape(t_len, -1)
        x = x + z @ p[pre + "self_attn.o_proj.weight"].T
        x = x + _mlp(_norm(x, p, pre + "post_attention_layernorm", c), p, pre + "mlp.", c, layer)
        summaries.append(x.cumsum(0) / count)
    x = _norm(x, p, "model.norm", c)
    head = p.get("lm_head.weight", p["model.embed_tokens.weight"])
    return x @ head.T, merges


def _check(merges_wanted: bool = False, **overrides):
    model = build(**overrides)
    ids = random_ids(1, 14, seed=3)[0]
    want, merges = reference_logits(model, ids)
    with torch.no_grad():
        got = model(ids[None], use_cache=False).logits[0].double()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if merges_wanted:
        assert merges and all(n > 0 for n in merges.values()), merges
    return model


def test_stack_is_the_documented_composition():
    _check()  # every novelty off: §1 with rope, plain GQA attention, swiglu, rmsnorm
    _check(tie_word_embeddings=False)


@pytest.mark.parametrize("norm", ["rmsnorm", "wiola_rmsnorm", "hln"])
def test_norms_follow_their_equations(norm):
    _check(norm=norm)


@pytest.mark.parametrize("encoding", ["rope", "spiral", "srpe"])
def test_rotary_tables_follow_their_equations(encoding):
    config = build(position_encoding=encoding).config
    positions = torch.tensor([[0, 1, 5, 17, 40]])
    cos, sin = WiolaRotaryEmbedding(config)(positions, torch.float64)
    want_c, want_s = _tables(config, positions[0])
    x = torch.randn(1, 2, 5, config.head_dim, dtype=torch.float64)
    got = apply_rotary(x, cos, sin)[0].transpose(0, 1)  # [T, heads, d_h]
    torch.testing.assert_close(got, _rot(x[0].transpose(0, 1), want_c, want_s), atol=1e-5, rtol=0)
    _check(position_encoding=encoding)


@pytest.mark.parametrize("pre_rope", [True, False], ids=["pre-rope", "post-rope"])
def test_gsa_gate_follows_its_equations(pre_rope):
    _check(position_encoding="spiral", attention_gate="gsa", gate_pre_rope=pre_rope)


@pytest.mark.parametrize("lookback", [1, 2, 4])
def test_gcla_follows_its_equations(lookback):
    _check(position_encoding="srpe", cross_layer_context="gcla", gcla_lookback=lookback)
    _check(attention_gate="gsa", cross_layer_context="gcla", gcla_lookback=lookback)  # the context query is not gated


@pytest.mark.parametrize("threshold", [-1.0, 0.2])
def test_atm_follows_its_equations(threshold):
    _check(True, token_merging="atm", atm_threshold=threshold)
    _check(True, position_encoding="srpe", cross_layer_context="gcla", token_merging="atm", atm_threshold=threshold, atm_layers=[0, 3, 5])


@pytest.mark.parametrize("overrides", [dict(mlp="swiglu"), dict(mlp="butterfly"), dict(mlp="dsff"), dict(mlp="gelu"), dict(mlp="agu"),
                                       dict(mlp="f3n", f3n_levels=3, f3n_level=[1, 2, 3, 3, 2, 1]),
                                       dict(mlp="f3n", f3n_gate="agu", f3n_levels=3, f3n_level=2)],
                         ids=["swiglu", "butterfly", "dsff", "gelu", "agu", "f3n", "f3n-agu"])
def test_mlps_follow_their_equations(overrides):
    _check(**overrides)
