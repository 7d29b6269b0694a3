"""`wiola convert`: reference fixtures reproduce their logits and greedy tokens, LLaMA converts exactly,
and broken sources are rejected with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wiola  # noqa: F401  (registers the Auto classes)
from wiola.cli import main
from wiola.convert import convert_checkpoint, load_source_checkpoint
from wiola.errors import WiolaError

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_DIRS = sorted(p for family in ("wiola13m", "wiola") for p in (FIXTURES / family).iterdir() if p.is_dir())
GSA = FIXTURES / "wiola13m" / "gsa_tied"
PAPER = FIXTURES / "wiola" / "gqa2_tied_atm_l6"


def _ids(paths):
    return [f"{p.parent.name}/{p.name}" for p in paths]


def test_fixture_folders_are_present():
    assert len([p for p in REFERENCE_DIRS if p.parent.name == "wiola13m"]) >= 4
    assert len([p for p in REFERENCE_DIRS if p.parent.name == "wiola"]) >= 5


@pytest.mark.parametrize("src", REFERENCE_DIRS, ids=_ids(REFERENCE_DIRS))
def test_reference_fixture_converts_with_same_logits_and_greedy_tokens(src, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = load_file(str(src / "reference.safetensors"))
    dst = tmp_path / "converted"
    model = convert_checkpoint(src, dst, quiet=True)
    with torch.no_grad():
        logits = model(ref["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)

    reloaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(reloaded).__name__ == "WiolaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ref["input_ids"], use_cache=False).logits, ref["logits"], atol=1e-4, rtol=0)

    greedy = json.loads((src / "greedy.json").read_text())
    expected = greedy.get("generated", greedy.get("tokens"))
    assert len(expected) == 20
    prompt = torch.tensor([greedy["prompt"]])
    gen_config = reloaded.generation_config
    gen_config.eos_token_id = None  # the references generated 20 tokens without stopping
    with torch.no_grad():
        out = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_config,
                                max_new_tokens=20, do_sample=False, num_beams=1)
    assert out[0, prompt.shape[1]:].tolist() == expected


def test_converted_configs_map_the_reference_fields(tmp_path):
    model13, _ = load_source_checkpoint(FIXTURES / "wiola13m" / "deep_postrope_untied")
    c = model13.config
    assert (c.position_encoding, c.attention_gate, c.mlp, c.norm) == ("spiral", "gsa", "butterfly", "rmsnorm")
    assert c.spiral_alpha == 0.3 and c.gate_pre_rope is False and c.tie_word_embeddings is False
    assert c.num_key_value_heads == c.num_attention_heads == 8

    bin13, _ = load_source_checkpoint(FIXTURES / "wiola13m" / "alpha0_nogate_bin")
    assert bin13.config.attention_gate == "none" and bin13.config.rope_theta == 500.0 and bin13.config.rms_norm_eps == 1e-5
    assert bin13.config.tie_word_embeddings and bin13.lm_head.weight is bin13.model.embed_tokens.weight

    paper, report = load_source_checkpoint(FIXTURES / "wiola" / "gqa4_untied_noatm_l5")
    c = paper.config
    assert (c.position_encoding, c.cross_layer_context, c.mlp, c.norm, c.token_merging) == ("srpe", "gcla", "dsff", "wiola_rmsnorm", "none")
    assert (c.rope_theta, c.srpe_k, c.srpe_amplitude, c.srpe_frequency) == (1000.0, 4.0, 0.25, 0.3)
    assert (c.intermediate_size, c.dsff_wide_size, c.gcla_lookback, c.gcla_gate_init) == (24, 64, 3, -1.0)
    assert c.num_key_value_heads == 1 and not c.tie_word_embeddings and report.kind == "wiola-0.1"

    quirk, report = load_source_checkpoint(FIXTURES / "wiola" / "quirk_lookback0_l5")
    assert quirk.config.gcla_lookback == 5  # 0 = all previous layers in the reference
    assert any("lookback 0" in note for note in report.notes)


def test_atm_is_off_by_default_and_kept_on_request(tmp_path):
    off, report = load_source_checkpoint(PAPER)
    assert off.config.token_merging == "none" and any("ATM turned off" in n for n in report.notes)
    on, _ = load_source_checkpoint(PAPER, keep_atm=True)
    assert on.config.token_merging == "atm" and on.config.atm_threshold == 0.92
    ref = load_file(str(PAPER / "reference.safetensors"))
    with torch.no_grad():  # this library's ATM merges at inference: it must really change these logits
        assert (on(ref["input_ids"], use_cache=False).logits - ref["logits"]).abs().max() > 1e-3
    convert_checkpoint(PAPER, tmp_path / "atm", keep_atm=True, quiet=True)
    assert json.loads((tmp_path / "atm" / "config.json").read_text())["token_merging"] == "atm"


def test_copies_tokenizer_and_generation_files_and_prints_summary(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(GSA, src)
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (src / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    convert_checkpoint(src, tmp_path / "dst")
    out = capsys.readouterr().out
    assert "wiola13m 1.0.x" in out and "115,176 parameters" in out and "tokenizer.json" in out
    assert len(out.strip().splitlines()) == 1
    dst = tmp_path / "dst"
    assert (dst / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert (dst / "special_tokens_map.json").is_file() and (dst / "model.safetensors").is_file()
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == 2
    assert json.loads((dst / "config.json").read_text())["position_encoding"] == "spiral"


# --------------------------------------------------------------------------- HF LLaMA
def _random_llama(tmp_path: Path, tied: bool = False, shard: bool = False, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kwargs = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, rope_theta=2500.0, rms_norm_eps=1e-5, max_position_embeddings=64,
                  tie_word_embeddings=tied)
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # move away from the init so that every tensor matters
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.3 if "norm" in name else 0.05))
    src = tmp_path / "llama"
    model.save_pretrained(src, max_shard_size="40KB" if shard else "5GB")
    return model, src


@pytest.mark.parametrize("tied,shard", [(False, False), (True, True)], ids=["untied", "tied-sharded"])
def test_llama_converts_with_identical_logits(tmp_path, tied, shard):
    llama, src = _random_llama(tmp_path, tied=tied, shard=shard)
    assert (src / "model.safetensors.index.json").is_file() == shard
    config = json.loads((src / "config.json").read_text())
    assert config["model_type"] == "llama"
    dst = tmp_path / "out"
    model = convert_checkpoint(src, dst, quiet=True)
    c = model.config
    assert (c.position_encoding, c.attention_gate, c.cross_layer_context, c.token_merging, c.mlp, c.norm) == (
        "rope", "none", "none", "none", "swiglu", "rmsnorm")
    assert c.rope_theta == 2500.0 and c.num_key_value_heads == 2 and c.rms_norm_eps == 1e-5
    assert c.tie_word_embeddings == tied
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = llama(ids).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, atol=1e-5, rtol=0)
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(dst).eval()
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, expected, atol=1e-5, rtol=0)


def test_llama_old_style_rope_theta_and_inv_freq_buffers(tmp_path):
    llama, src = _random_llama(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = None
    (src / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # saved by old transformers versions
    save_file(tensors, str(src / "model.safetensors"))
    model, _ = load_source_checkpoint(src)
    assert model.config.rope_theta == 2500.0
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, llama(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 2500.0}}, "rope scaling type 'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"sliding_window": 8}, "sliding_window"),
])
def test_llama_unsupported_settings_are_rejected(tmp_path, change, message):
    _, src = _random_llama(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.update(change)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(WiolaError, match=message.replace("(", r"\(")):
        load_source_checkpoint(src)


# --------------------------------------------------------------------------- rejected sources
def _copy(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "src"
    shutil.copytree(src, out)
    return out


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named(tmp_path):
    src = _copy(PAPER, tmp_path)
    _edit_weights(src, lambda t: t.pop("model.layers.3.ffn.up_b.weight"))
    with pytest.raises(WiolaError, match=r"missing 1 tensor\(s\): model\.layers\.3\.mlp\.wide_up_proj\.weight"):
        convert_checkpoint(src, tmp_path / "dst", quiet=True)
    assert not (tmp_path / "dst").exists()


def test_untied_head_is_required(tmp_path):
    src = _copy(FIXTURES / "wiola13m" / "alpha0_gate_untied", tmp_path)
    _edit_weights(src, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(WiolaError, match=r"missing 1 tensor\(s\): lm_head\.weight"):
        load_source_checkpoint(src)


def test_tied_head_that_differs_from_embeddings_is_rejected(tmp_path):
    src = _copy(PAPER, tmp_path)
    _edit_weights(src, lambda t: t.__setitem__("lm_head.weight", torch.randn_like(t["model.embed_tokens.weight"])))
    with pytest.raises(WiolaError, match="tied.*different lm_head.weight and model.embed_tokens.weight"):
        load_source_checkpoint(src)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    src = _copy(GSA, tmp_path)
    _edit_weights(src, lambda t: t.__setitem__("model.layers.1.mlp.bypass_proj.weight", torch.zeros(100, 64)))
    with pytest.raises(WiolaError, match=r"model\.layers\.1\.mlp\.bypass_proj\.weight has shape \[100, 64\], expected \[128, 64\]"):
        load_source_checkpoint(src)


def test_wrong_shape_of_renamed_tensor_names_the_source_name(tmp_path):
    src = _copy(PAPER, tmp_path)
    _edit_weights(src, lambda t: t.__setitem__("model.layers.0.attn.gate_proj.weight", torch.zeros(32, 31)))
    with pytest.raises(WiolaError, match=r"attn\.gate_proj\.weight \(-> model\.layers\.0\.self_attn\.output_gate_proj\.weight\) "
                                         r"has shape \[32, 31\], expected \[32, 32\]"):
        load_source_checkpoint(src)


def test_unknown_extra_tensors_are_listed(tmp_path):
    src = _copy(PAPER, tmp_path)

    def add(t):
        t["model.layers.2.attn.rel_bias"] = torch.zeros(4)
        t["model.extra_scale"] = torch.ones(1)

    _edit_weights(src, add)
    with pytest.raises(WiolaError, match=r"2 tensor\(s\) this configuration does not use: .*model\.layers\.2\.attn\.rel_bias"):
        load_source_checkpoint(src)


def test_gate_weights_without_gate_are_leftovers(tmp_path):
    src = _copy(GSA, tmp_path)
    _edit_config(src, lambda c: c.__setitem__("use_attention_gate", False))
    with pytest.raises(WiolaError, match=r"does not use: .*gate_fc1"):
        load_source_checkpoint(src)


@pytest.mark.parametrize("folder,field", [(GSA, "spiral_beta"), (PAPER, "srpe_mode"), (PAPER, "quantization_config")])
def test_unknown_config_field_is_named(tmp_path, folder, field):
    src = _copy(folder, tmp_path)
    _edit_config(src, lambda c: c.__setitem__(field, 1))
    with pytest.raises(WiolaError, match=f"not understood.*{field}"):
        load_source_checkpoint(src)


def test_harmless_generic_fields_are_ignored(tmp_path):
    src = _copy(GSA, tmp_path)
    _edit_config(src, lambda c: c.update(_name_or_path="x", output_attentions=False, max_length=20, id2label={"0": "a"}))
    load_source_checkpoint(src)


def test_missing_unreadable_and_unknown_configs(tmp_path):
    src = _copy(GSA, tmp_path)
    (src / "config.json").write_text("{not json")
    with pytest.raises(WiolaError, match="cannot read .*config.json"):
        convert_checkpoint(src, tmp_path / "dst", quiet=True)
    (src / "config.json").unlink()
    with pytest.raises(WiolaError, match="has no config.json"):
        convert_checkpoint(src, tmp_path / "dst", quiet=True)
    with pytest.raises(WiolaError, match="does not exist"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "dst", quiet=True)
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(WiolaError, match="model_type 'gpt2' is not supported"):
        load_source_checkpoint(src)
    (src / "config.json").write_text(json.dumps({"model_type": "wiola", "hidden_size": 64}))
    with pytest.raises(WiolaError, match="cannot tell which package"):
        load_source_checkpoint(src)
    _edit_config(src, lambda c: c.update(spiral_alpha=0.1, srpe_theta=1.0))
    with pytest.raises(WiolaError, match="mixes"):
        load_source_checkpoint(src)


def test_missing_weights_file_and_required_field(tmp_path):
    src = _copy(GSA, tmp_path)
    _edit_config(src, lambda c: c.pop("hidden_size"))
    with pytest.raises(WiolaError, match="lacks required field.*hidden_size"):
        load_source_checkpoint(src)
    src2 = _copy(PAPER, tmp_path / "b")
    (src2 / "model.safetensors").unlink()
    with pytest.raises(WiolaError, match="holds no weights"):
        load_source_checkpoint(src2)


def test_native_checkpoint_is_recognised(tmp_path):
    convert_checkpoint(GSA, tmp_path / "native", quiet=True)
    with pytest.raises(WiolaError, match="already in wiola's native format"):
        convert_checkpoint(tmp_path / "native", tmp_path / "again", quiet=True)


def test_non_empty_destination_needs_force(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    (dst / "pytorch_model.bin").write_text("stale")
    with pytest.raises(WiolaError, match="not empty; pass --force"):
        convert_checkpoint(GSA, dst, quiet=True)
    assert (dst / "pytorch_model.bin").read_text() == "stale"
    convert_checkpoint(GSA, dst, force=True, quiet=True)
    assert (dst / "notes.txt").read_text() == "keep me"
    # a file the conversion did not write is never deleted (issue 19); the new weights sit beside it
    assert (dst / "pytorch_model.bin").read_text() == "stale" and (dst / "model.safetensors").is_file()
    with pytest.raises(WiolaError, match="must differ"):
        convert_checkpoint(GSA, GSA, force=True, quiet=True)


# --------------------------------------------------------------------------- CLI
def test_cli_convert_success_and_errors(tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", str(PAPER), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "wiola 0.1.x" in out and "ATM turned off" in out
    assert (dst / "config.json").is_file()

    assert main(["convert", str(PAPER), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wiola convert: error:") and "--force" in err and len(err.splitlines()) == 1
    assert main(["convert", str(PAPER), str(dst), "--force", "--keep-atm"]) == 0
    assert json.loads((dst / "config.json").read_text())["token_merging"] == "atm"
    capsys.readouterr()

    bad = _copy(GSA, tmp_path)
    _edit_weights(bad, lambda t: t.pop("model.norm.weight"))
    assert main(["convert", str(bad), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.norm.weight" in err


@pytest.mark.parametrize("keep", ["both", "embed_tokens", "lm_head"])
def test_tied_checkpoint_with_either_or_both_names_converts(tmp_path, keep):
    """Tied checkpoints store the shared matrix under both names (.bin), only the embeddings
    (save_pretrained) or only lm_head.weight (safetensors' save_model): all three convert exactly."""
    from safetensors.torch import save_model

    llama, src = _random_llama(tmp_path, tied=True)
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    (src / "model.safetensors").unlink()
    if keep == "lm_head":
        save_model(llama, str(src / "model.safetensors"))  # dedups tied tensors, keeping one name
        assert "model.embed_tokens.weight" not in load_file(str(src / "model.safetensors"))
    else:
        if keep == "embed_tokens":
            state.pop("lm_head.weight")
        save_file(state, str(src / "model.safetensors"))
    model = convert_checkpoint(src, tmp_path / "out", quiet=True)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, llama(ids).logits, atol=1e-4, rtol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_reference_layer0_context_tensors_are_dropped_with_logits_unchanged(tmp_path, capsys):
    """wiola 0.1.x stores GCLA context projections and a blend on layer 0, which never reads them;
    conversion drops them (this library does not build them) and the logits still match the reference."""
    ref_tensors = load_file(str(PAPER / "model.safetensors"))
    assert "model.layers.0.attn.k_ctx_proj.weight" in ref_tensors and "model.layers.0.attn.blend_logit" in ref_tensors
    model = convert_checkpoint(PAPER, tmp_path / "out", quiet=False)
    assert "Dropped layer 0's unused GCLA tensors" in capsys.readouterr().out
    names = dict(model.named_parameters())
    assert not any(n.startswith("model.layers.0.self_attn.") and ("ctx" in n or "blend" in n) for n in names)
    assert names["model.layers.1.self_attn.blend_logit"].shape == (1,)
    ref = load_file(str(PAPER / "reference.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids"], use_cache=False).logits, ref["logits"], atol=1e-4, rtol=0)
