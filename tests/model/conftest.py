"""Shared tiny configurations and helpers for the model tests."""

from __future__ import annotations

import itertools

import pytest
import torch

from wiola import WiolaConfig, WiolaForCausalLM

POSITION = ("rope", "spiral", "srpe")
GATE = ("none", "gsa")
CROSS = ("none", "gcla")
MLP = ("swiglu", "butterfly", "dsff", "gelu")
NORM = ("rmsnorm", "wiola_rmsnorm")

COMBOS = [dict(position_encoding=p, attention_gate=g, cross_layer_context=c, mlp=m, norm=n) for p, g, c, m, n in itertools.product(POSITION, GATE, CROSS, MLP, NORM)]
# the article's components (docs/architecture.md §6) in every attention/position context, each with a different norm or MLP:
# 4 contexts × 4 settings instead of the full product (which would more than double the suite)
_CONTEXTS = [dict(position_encoding="rope"), dict(position_encoding="spiral", attention_gate="gsa"),
             dict(position_encoding="srpe", cross_layer_context="gcla"), dict(position_encoding="rope", attention_gate="gsa", cross_layer_context="gcla")]
_ARTICLE = [dict(mlp="agu", norm="rmsnorm"), dict(mlp="f3n", f3n_levels=3, f3n_level=2, norm="wiola_rmsnorm"),
            dict(mlp="f3n", f3n_gate="agu", f3n_levels=3, f3n_level=[1, 2, 3, 3, 2, 1], norm="hln")]
ARTICLE_COMBOS = [dict(ctx, **new) for ctx in _CONTEXTS for new in _ARTICLE]
ARTICLE_COMBOS += [dict(ctx, mlp=mlp, norm="hln") for ctx, mlp in zip(_CONTEXTS, ("swiglu", "butterfly", "dsff", "gelu"))]
COMBOS = COMBOS + ARTICLE_COMBOS


def combo_id(combo: dict) -> str:
    return "-".join(str(v).replace(" ", "") for v in combo.values())


def tiny_config(**overrides) -> WiolaConfig:
    base = dict(
        vocab_size=61, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, dsff_wide_size=56, max_position_embeddings=64, spiral_alpha=0.3, srpe_amplitude=0.3,
        srpe_frequency=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    base.update(overrides)
    return WiolaConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.15) -> torch.nn.Module:
    """Perturb every parameter so that no component sits at a trivial init (zero offsets, zero biases,
    small blend) and a mistake anywhere shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith("blend_logit"):
                p.fill_(0.3)
            elif name.endswith("threshold_scale"):  # AGU: a threshold that zeroes a good share of the gate
                p.fill_(0.5)
            elif name.endswith(".mix"):  # HLN: all three scopes of statistics in play
                p.copy_(torch.tensor([0.25, 0.35]))
    return model


def build(seed: int = 0, **overrides) -> WiolaForCausalLM:
    torch.manual_seed(seed)
    return randomize(WiolaForCausalLM(tiny_config(**overrides)), seed).eval()


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 61) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


@pytest.fixture(params=COMBOS, ids=combo_id)
def combo(request) -> dict:
    return request.param
