"""`wiola export --to llama`: what counts as LLaMA, the saved folder against transformers' own LLaMA, and
CTranslate2's greedy tokens against ours."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.export.conftest import save_model
from wiola import WiolaConfig, WiolaForCausalLM
from wiola.cli import main
from wiola.errors import WiolaError
from wiola.export import export_model
from wiola.export.llama import llama_blockers

NEW = 24


def prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 40, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded
    return ids, mask


def greedy(model, ids, mask, new=NEW):
    """Greedy tokens that do not stop at the end-of-sequence token."""
    model.generation_config.eos_token_id = None  # (generate fills an unset eos_token_id from the model's config)
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, char_tokenizer):
    root = tmp_path_factory.mktemp("llama")
    src = save_model(root / "model", char_tokenizer, "all-off", tie_word_embeddings=False)
    export_model(src, root / "llama", "llama", quiet=True)
    return src, root / "llama"


def test_saved_folder_is_plain_llama_with_equal_logits(exported):
    src, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not list(out.glob("*.py")) and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    llama = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    ours = WiolaForCausalLM.from_pretrained(src).eval()
    ids, mask = prompts()
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    assert torch.equal(greedy(ours, ids, mask), greedy(llama, ids, mask))
    assert AutoTokenizer.from_pretrained(out).convert_ids_to_tokens([0, 1]) == ["<|bos|>", "<|eos|>"]


def test_ctranslate2_greedy_tokens_equal_ours(exported, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (optional): CTranslate2 check skipped")
    from ctranslate2.converters import TransformersConverter

    src, out = exported
    TransformersConverter(str(out)).convert(str(tmp_path / "ct2"))  # what ct2-transformers-converter --model OUT runs
    generator = ctranslate2.Generator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = WiolaForCausalLM.from_pretrained(src).eval()
    ids, mask = prompts()
    expected = greedy(ours, ids, mask).tolist()
    starts = [tokenizer.convert_ids_to_tokens(row[m.bool()].tolist()) for row, m in zip(ids, mask)]
    results = generator.generate_batch(starts, max_length=NEW, sampling_topk=1, end_token=[], include_prompt_in_result=False)
    assert [r.sequences_ids[0] for r in results] == expected
    streamed = [step.token_id for step in generator.generate_tokens(starts[1], max_length=NEW, sampling_topk=1, end_token=[])]
    assert streamed == expected[1]


def test_llama_by_value_is_accepted(tmp_path, char_tokenizer):
    """spiral with α = 0, ATM that merges nowhere and wiola_rmsnorm with zero offsets are LLaMA."""
    src = save_model(tmp_path / "model", char_tokenizer, "all-off", position_encoding="spiral", spiral_alpha=0.0,
                     token_merging="atm", atm_layers=[], norm="wiola_rmsnorm")
    export_model(src, tmp_path / "llama", "llama", quiet=True)
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ours = WiolaForCausalLM.from_pretrained(src).eval()
    ids, mask = prompts()
    with torch.no_grad():
        assert (ours(ids, attention_mask=mask).logits - llama(ids, attention_mask=mask).logits)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("fields, named", [
    (dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly"), ["position_encoding=spiral (spiral_alpha != 0)", "attention_gate=gsa", "mlp=butterfly"]),
    (dict(position_encoding="srpe", cross_layer_context="gcla", token_merging="atm", mlp="dsff", norm="wiola_rmsnorm", num_hidden_layers=3),
     ["position_encoding=srpe", "cross_layer_context=gcla", "token_merging=atm (merging in layers 1)", "mlp=dsff", "norm=wiola_rmsnorm"]),
    (dict(token_merging="atm", atm_threshold=0.99, atm_layers=[0]), ["token_merging=atm (merging in layers 0)"]),
    (dict(mlp="gelu"), ["mlp=gelu"]),
])
def test_blockers_name_every_component(fields, named):
    config = WiolaConfig(**{"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2, **fields})
    assert llama_blockers(config) == named


def test_non_llama_is_refused_in_one_line_and_nothing_written(tmp_path, char_tokenizer, capsys):
    src = save_model(tmp_path / "model", char_tokenizer, "seed")
    assert main(["export", str(src), str(tmp_path / "out"), "--to", "llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a LLaMA model" in err and "attention_gate=gsa" in err and "mlp=butterfly" in err
    assert not (tmp_path / "out").exists()
    offsets = save_model(tmp_path / "norm", char_tokenizer, "all-off", norm="wiola_rmsnorm")
    model = WiolaForCausalLM.from_pretrained(offsets)
    with torch.no_grad():
        model.model.norm.offset.fill_(0.01)
    model.save_pretrained(offsets)
    with pytest.raises(WiolaError, match=r"norm=wiola_rmsnorm with non-zero offsets \(1 norm\(s\), e.g. model.norm.offset\)"):
        export_model(offsets, tmp_path / "out", "llama")
    assert main(["export", str(src), str(tmp_path / "out")]) == 2
    assert "--to llama, --to onnx or --to gguf" in capsys.readouterr().err


def test_tokenizer_config_loads_in_transformers_4_and_the_converter_limit_is_said(exported, tmp_path, capsys):
    """transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 (and llama.cpp's converter,
    pinned to it) cannot load; the export names PreTrainedTokenizerFast, under which transformers 5 loads the same
    tokenizer. The summary says llama.cpp's converter cannot read a newly trained tokenizer."""
    src, out = exported
    assert json.loads((src / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    from wiola.data.tokenizer import load_tokenizer

    text = "the king  greets\tÜnïcödé ☺ <|bos|>x<|eos|>"
    ours, theirs = load_tokenizer(src), AutoTokenizer.from_pretrained(out)
    assert theirs(text).input_ids == ours(text).input_ids and theirs.all_special_tokens == ours.all_special_tokens
    export_model(src, tmp_path / "again", "llama")
    summary = capsys.readouterr().out
    assert "convert_hf_to_gguf.py cannot read this tokenizer" in summary and "use wiola export --to gguf" in summary
