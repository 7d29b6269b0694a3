"""`wiola export --to llama`: save a Wiola model that is exactly a LLaMA decoder as a plain `LlamaForCausalLM`.

A Wiola model computes what LLaMA computes when every component switch has its all-off value (the
`WiolaConfig` defaults: `rope`, no gate, no cross-layer context, no merging, `swiglu`, `rmsnorm`), and also in
three cases that are LLaMA by value:

* `spiral` with `spiral_alpha = 0` (its frequencies are then RoPE's, bit for bit);
* `atm` that merges in no layer (`atm_layers = []`, or `atm_threshold >= 1`, where ATM is switched off);
* `wiola_rmsnorm` whose learned offsets δ are all exactly zero (checked on the weights).

Anything else is refused with one line naming every component that stands in the way. Weight names are
LLaMA's already; the norm offsets (zero) are dropped. The saved folder loads with
`transformers.AutoModelForCausalLM` without `trust_remote_code`, and so opens CTranslate2 and vLLM. The
tokenizer files are copied, with `tokenizer_config.json`'s `tokenizer_class` written as
`PreTrainedTokenizerFast` (transformers 5 writes `TokenizersBackend`, a name transformers 4 cannot load; both
releases load the same tokenizer under the old name). llama.cpp's `convert_hf_to_gguf.py` reads the weights
but not a newly trained tokenizer (`CONVERTER_NOTE`; `wiola export --to gguf` writes the GGUF instead). Before
anything is written the LLaMA model's logits are checked against the Wiola model's on a probe batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from wiola.configuration_wiola import _CHOICES, WiolaConfig
from wiola.errors import WiolaError

# switches whose value does not change what a model computes at inference (the ATM kernel picks how, not what)
_NOT_MATH = {"atm_kernel"}
CONVERTER_NOTE = ("llama.cpp's convert_hf_to_gguf.py cannot read this tokenizer (it recognises a BPE tokenizer by a "
                  "hash of its output, and a newly trained vocabulary is not among the ones it knows): for llama.cpp use "
                  "wiola export --to gguf")
PROBE_TOLERANCE = 1e-4  # fp32 logits (the model is loaded in fp32), LLaMA vs Wiola; they agree to ~1e-6 in practice


def llama_blockers(config: WiolaConfig, state_dict: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Why `config` (with weights `state_dict`, to check norm offsets) is not exactly LLaMA: one short
    phrase per component; empty when it is."""
    reasons = []
    for field in _CHOICES:
        if field in _NOT_MATH:
            continue
        value, llama = getattr(config, field), getattr(WiolaConfig, field)
        if value == llama:
            continue
        if field == "position_encoding" and value == "spiral" and config.spiral_alpha == 0:
            continue
        if field == "token_merging" and value == "atm" and (not config.merge_layers or config.atm_threshold >= 1.0):
            continue
        if field == "norm" and value == "wiola_rmsnorm" and state_dict is not None:
            nonzero = [k for k, v in state_dict.items() if k.endswith(".offset") and bool(v.any())]
            if not nonzero:
                continue
            reasons.append(f"norm=wiola_rmsnorm with non-zero offsets ({len(nonzero)} norm(s), e.g. {nonzero[0]})")
            continue
        detail = {"position_encoding": " (spiral_alpha != 0)" if value == "spiral" else "",
                  "token_merging": " (merging in layers " + ", ".join(map(str, config.merge_layers)) + ")" if value == "atm" else ""}.get(field, "")
        reasons.append(f"{field}={value}{detail}")
    return reasons


def llama_config(config: WiolaConfig):
    """The `transformers.LlamaConfig` of the same shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False, mlp_bias=False, attention_dropout=config.attention_dropout,
        initializer_range=config.initializer_range, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def to_llama(model):
    """A `LlamaForCausalLM` (eval mode, same dtype) with `model`'s weights; `WiolaError` when the model is not
    exactly LLaMA, naming the components that prevent it."""
    from transformers import LlamaForCausalLM

    state = {k: v for k, v in model.state_dict().items()}
    blockers = llama_blockers(model.config, state)
    if blockers:
        raise WiolaError(f"not a LLaMA model: {'; '.join(blockers)} (only an all-off model exports --to llama; use --to onnx)")
    state = {k: v for k, v in state.items() if not k.endswith(".offset")}
    dtype = next(model.parameters()).dtype
    llama = LlamaForCausalLM(llama_config(model.config)).to(dtype)
    result = llama.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and llama.config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise WiolaError(f"weights do not map onto LLaMA: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    llama.tie_weights()
    llama.generation_config = model.generation_config
    return llama.eval()


def probe_difference(model, llama, length: int = 16) -> float:
    """Largest |logit difference| between the two models on a fixed random batch (one row left-padded)."""
    g = torch.Generator().manual_seed(0)
    length = min(length, model.config.max_position_embeddings)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : length // 4] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits.float()
        theirs = llama(ids, attention_mask=mask).logits.float()
    return float((ours - theirs)[mask.bool()].abs().max())


def export_llama(model, model_dir: Path, folder: Path) -> list[str]:
    """Write the LLaMA form of `model` (loaded from `model_dir`) into `folder`; returns notes for the summary."""
    from wiola.convert import TOKENIZER_FILES

    llama = to_llama(model)
    diff = probe_difference(model, llama)
    if not diff <= PROBE_TOLERANCE:
        raise WiolaError(f"the LLaMA model's logits differ from the Wiola model's by {diff:.3g} on a probe batch; nothing written")
    llama.save_pretrained(folder, safe_serialization=True)
    copied = [name for name in TOKENIZER_FILES if (model_dir / name).is_file() and not (model_dir / name).is_symlink()]
    for name in copied:
        shutil.copyfile(model_dir / name, folder / name)
    if "tokenizer_config.json" in copied:
        portable_tokenizer_config(folder / "tokenizer_config.json")
    notes = [f"LlamaForCausalLM, {model.config.num_hidden_layers} layers, {model.config.num_attention_heads}/"
             f"{model.config.num_key_value_heads} heads, rope theta {model.config.rope_theta:g}; probe logits agree to {diff:.1e}"]
    if model.config.hidden_dropout:
        notes.append(f"hidden_dropout={model.config.hidden_dropout} is not a LLaMA field and was dropped (training only)")
    notes.append(f"tokenizer files: {', '.join(copied)}" if copied else "no tokenizer files found to copy")
    if "tokenizer.json" in copied:
        notes.append(CONVERTER_NOTE)
    return notes


def portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class `PreTrainedTokenizerFast` where transformers 5 wrote `TokenizersBackend`: the
    class transformers 4 (and the tools pinned to it, such as llama.cpp's converter) loads a tokenizer.json with;
    transformers 5 maps the old name onto the same class."""
    import json

    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
