"""WiolaConfig validation, presets and their real parameter counts."""

from __future__ import annotations

import pytest
import torch

from wiola import WiolaConfig, WiolaForCausalLM, list_presets
from wiola.configuration_wiola import PRESETS, count_parameters

# docs/architecture.md §3 (tied embeddings): what the reference implementations build, less the paper sizes' dead layer-0
# GCLA tensors (W_kc, W_vc, φ), which this library does not build.
SPEC_COUNTS = {
    "wiola-nano": 12_915_888,
    "wiola-micro": 26_454_624,
    "wiola-small": 54_154_944,
    "wiola-120m": 146_904_587,
    "wiola-360m": 317_523_983,
    "wiola-700m": 1_066_159_127,
    "wiola-1.5b": 2_175_504_411,
}
# what the reference package `wiola==0.1.1` builds, dead tensors included
REFERENCE_COUNTS = {"wiola-120m": 147_297_804, "wiola-360m": 318_048_272, "wiola-700m": 1_068_518_424, "wiola-1.5b": 2_179_698_716}


@pytest.mark.parametrize("name", list(SPEC_COUNTS))
def test_preset_counts_match_spec(name):
    assert list_presets()[name] == SPEC_COUNTS[name]


@pytest.mark.parametrize("name", list(REFERENCE_COUNTS))
def test_paper_presets_are_the_reference_less_layer0_context(name):
    c = WiolaConfig.from_preset(name)
    dead = 2 * c.hidden_size * c.num_key_value_heads * c.head_dim + 1
    assert list_presets()[name] + dead == REFERENCE_COUNTS[name]


def test_architecture_table_matches_the_presets():
    """docs/architecture.md §3 lists every preset with its real count, shape and components."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    rows = {m[0]: m[1:] for m in re.findall(r"^\| `([\w.-]+)` \| ([\d,]+) \| (\d+) \| (\d+) \| (\d+) / (\d+) \| ([\d,]+) \|", doc, re.M)}
    assert set(rows) == set(PRESETS)
    for name, count in list_presets().items():
        c = WiolaConfig.from_preset(name)
        want = (f"{count:,}", str(c.hidden_size), str(c.num_hidden_layers), str(c.num_attention_heads), str(c.num_key_value_heads),
                f"{c.max_position_embeddings:,}")
        assert rows[name] == want, name
    for name, count in SPEC_COUNTS.items():
        assert rows[name][0] == f"{count:,}", name


@pytest.mark.parametrize("name", ["wiola-nano", "wiola-micro", "wiola-120m", "llama-nano", "llama-120m", "wiola-1.3b", "wiola-1.3b-article", "llama-3b"])
def test_built_model_has_the_counted_parameters(name):
    config = WiolaConfig.from_preset(name)
    with torch.device("meta"):
        model = WiolaForCausalLM(config)
        model.tie_weights()  # transformers 5.0 skips tying on the meta device
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("wiola-")])
def test_llama_baseline_matches_budget(name):
    base = WiolaConfig.from_preset("llama-" + name.split("-", 1)[1])
    assert (base.position_encoding, base.attention_gate, base.cross_layer_context, base.token_merging, base.mlp, base.norm) == ("rope", "none", "none", "none", "swiglu", "rmsnorm")
    target = list_presets()[name]
    per_8_width = 3 * base.hidden_size * base.num_hidden_layers * 8
    assert abs(count_parameters(base) - target) <= per_8_width / 2


def test_llama_3b_is_the_transformers_llama_of_that_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    c = WiolaConfig.from_preset("llama-3b")
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                                             num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                                             intermediate_size=c.intermediate_size, tie_word_embeddings=True))
        llama.tie_weights()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (3072, 28, 24, 8, 8192)
    assert count_parameters(c) == sum(p.numel() for p in llama.parameters())


def test_preset_overrides_and_unknown_preset():
    config = WiolaConfig.from_preset("wiola-nano", num_hidden_layers=2, vocab_size=100)
    assert config.num_hidden_layers == 2 and config.mlp == "butterfly"
    with pytest.raises(ValueError, match="unknown preset 'wiola-huge'.*wiola-nano"):
        WiolaConfig.from_preset("wiola-huge")


@pytest.mark.parametrize("field,value,message", [
    ("position_encoding", "alibi", "position_encoding='alibi' is not valid; choose one of: rope, spiral, srpe"),
    ("attention_gate", "gate", "choose one of: none, gsa"),
    ("cross_layer_context", "x", "choose one of: none, gcla"),
    ("token_merging", "tome", "choose one of: none, atm"),
    ("mlp", "moe", "choose one of: swiglu, butterfly, dsff, gelu, agu, f3n"),
    ("norm", "layernorm", "choose one of: rmsnorm, wiola_rmsnorm, hln"),
    ("f3n_sampling", "random", "choose one of: none, step, layer"),
    ("f3n_gate", "relu", "choose one of: swiglu, agu"),
])
def test_unknown_component_lists_choices(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        WiolaConfig(**{field: value})


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden_size=100, num_attention_heads=8), "num_attention_heads=8 does not divide hidden_size=100"),
    (dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads=3 does not divide num_attention_heads=8"),
    (dict(hidden_size=36, num_attention_heads=4), "head_dim=9 is odd"),
    (dict(atm_layers=[7], num_hidden_layers=6), r"atm_layers \[7\] are outside 0..5"),
    (dict(hidden_dropout=1.5), "hidden_dropout must be in"),
    (dict(agu_l1=-0.1), "agu_l1 must be a number >= 0"),
    (dict(mlp="f3n", intermediate_size=64, f3n_level=5), r"f3n_level 5 is outside 1..4"),
    (dict(mlp="f3n", intermediate_size=64, num_hidden_layers=3, f3n_level=[1, 2]), "f3n_level lists 2 levels for 3 layers"),
])
def test_invalid_shapes_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WiolaConfig(**kwargs)


def test_merge_layers_default_to_middle_third():
    assert WiolaConfig.from_preset("wiola-120m").merge_layers == [4, 5, 6, 7]
    assert WiolaConfig(num_hidden_layers=6, token_merging="atm").merge_layers == [2, 3]
    assert WiolaConfig(num_hidden_layers=6, token_merging="atm", atm_layers=[0, 5]).merge_layers == [0, 5]
    assert WiolaConfig(num_hidden_layers=6).merge_layers == []


def test_config_json_round_trip(tmp_path):
    config = WiolaConfig.from_preset("wiola-120m", atm_layers=[3, 4])
    config.save_pretrained(tmp_path)
    again = WiolaConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
