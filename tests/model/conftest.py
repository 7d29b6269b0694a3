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


def combo_id(combo: dict) -> str:
    return "-".join(str(v) for v in combo.values())


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
