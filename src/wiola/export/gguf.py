"""`wiola export --to gguf`: a model that is exactly LLaMA as one GGUF file for llama.cpp.

It takes the models `--to llama` takes (`wiola.export.llama.llama_blockers`) and writes their LLaMA weights
(`wiola.export.llama.to_llama`) with llama.cpp's gguf-py (the `gguf` package, in the `export` extra) into
`OUT/model.gguf`, for llama.cpp's LLAMA architecture:

* Tensor names: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
  ffn_up, ffn_down}`, `output_norm`, `output` (left out when the embeddings are tied: llama.cpp then reads
  `token_embd`).
* Rotary layout: transformers' LLaMA rotates the pairs (i, i + d/2) of each head, llama.cpp the adjacent
  pairs (2i, 2i + 1). The rows of `q_proj` and `k_proj` are reordered per head (`interleave_rotary`), the same
  order for both, so every attention score is unchanged.
* Types (`GGUF_TYPES`): f32; f16 (norms stay f32, as in llama.cpp's own files); q8_0 and q4_0 (blocks of 32
  along a row, one scale per block) for every matrix whose rows are a multiple of 32 long, the others f16
  (said in the summary).
* Tokenizer (`gguf_vocabulary`): Wiola's two kinds, described so that llama.cpp tokenizes as we do. The
  byte-level BPE is GPT-2's scheme: model `gpt2`, pre-tokenizer `gpt-2`, our tokens and merges. The
  character tokenizer becomes a `gpt2` vocabulary too: each character written in the byte-level alphabet,
  and for each character of several UTF-8 bytes the merges that join its bytes, so that every character is
  one token again. Special tokens are control tokens; no BOS or EOS is added (Wiola encodes without them).
  Other tokenizers are refused. A character the character tokenizer never saw is `<|unk|>` for us and
  dropped by llama.cpp (it has no fallback to an unknown token in this mode).

Before the file is placed, it is read back (`gguf.GGUFReader`, dequantized) and a numpy forward pass of the
graph llama.cpp builds from it (`gguf_logits`: adjacent-pair RoPE included) is compared with our model's
logits on a probe sequence: f32 is refused beyond `PROBE_TOLERANCE`, the other types report their distance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wiola.errors import WiolaError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
FILE_NAME = "model.gguf"
BLOCK = 32  # Q8_0 / Q4_0 block length along a row
PROBE_TOLERANCE = 1e-4  # f32: largest |logit difference| between the GGUF's forward pass and PyTorch's
_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def require_gguf():
    """The `gguf` module, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise WiolaError("--to gguf needs the gguf package (llama.cpp's gguf-py): pip install 'wiola[export]'") from None
    return gguf


def interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection [heads * d, in] from the half-split rotary layout (row i
    pairs with i + d/2 within a head) to the adjacent one (row 2i pairs with 2i + 1)."""
    rows, cols = weight.shape
    d = rows // heads
    return weight.reshape(heads, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(llama_state: dict, config) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor of a `LlamaForCausalLM` state dict, in llama.cpp's layout."""
    state = {k: v.detach().float().cpu().numpy() for k, v in llama_state.items()}
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for hf, name in _LAYER_NAMES.items():
            array = state[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                array = interleave_rotary(array, config.num_attention_heads if name == "attn_q" else config.num_key_value_heads)
            out.append((f"blk.{i}.{name}.weight", array))
    out.append(("output_norm.weight", state["model.norm.weight"]))
    if not config.tie_word_embeddings:
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the other bytes take the
    characters from U+0100 on, in byte order."""
    itself = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in itself:
            table[b] = chr(b)
        else:
            table[b], extra = chr(0x100 + extra), extra + 1
    return table


@dataclass
class GgufVocabulary:
    """What the `tokenizer.ggml.*` keys hold."""
    kind: str  # "bpe" or "char"
    tokens: list[str]
    types: list[int]
    merges: list[str]
    unk: int | None = None
    notes: list[str] = field(default_factory=list)


def tokenizer_kind(spec: dict) -> str | None:
    """"bpe" (byte-level BPE with GPT-2's pre-tokenisation), "char" (one token per character) or None for a
    tokenizer.json that is neither, in the exact forms `wiola.data.tokenizer` trains."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    if (model.get("type") != "BPE" or spec.get("normalizer") or model.get("dropout") or model.get("byte_fallback")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges")):
        return None
    added = {t["content"] for t in spec.get("added_tokens", [])}
    if pre is None and not model.get("merges"):
        return "char" if all(len(t) == 1 for t in model.get("vocab", {}) if t not in added) else None
    if (pre or {}).get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", True):
        return "bpe"
    return None


def gguf_vocabulary(tokenizer_file: Path, vocab_size: int) -> GgufVocabulary:
    """The GGUF description of the tokenizer in `tokenizer_file` for a model of `vocab_size` rows (rows past the
    tokenizer's ids become unused `[PADn]` tokens, as llama.cpp's converter writes them)."""
    import gguf

    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    kind = tokenizer_kind(spec)
    if kind is None:
        raise WiolaError(f"{tokenizer_file} is neither a byte-level BPE nor a character tokenizer as wiola trains them; "
                         "llama.cpp could tokenize it differently, so --to gguf does not write it")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: text for text, i in spec["model"]["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= vocab_size:
        raise WiolaError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embedding rows")
    alphabet = byte_level_alphabet()
    tokens, types, merges = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            if kind == "char":  # the character in the byte-level alphabet, and the merges that put its bytes together
                mapped = [alphabet[b] for b in text.encode("utf-8")]
                merges.extend("".join(mapped[:k]) + " " + mapped[k] for k in range(1, len(mapped)))
                text = "".join(mapped)
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    if len(set(tokens)) != len(tokens):
        raise WiolaError("two tokens of the GGUF vocabulary have the same text (an unused row's [PADn] name is taken)")
    if kind == "bpe":
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    notes = []
    if not merges:  # llama.cpp requires the key and gguf-py cannot write an empty array: a pair no text can form
        merges = [f"{tokens[min(added)]} {tokens[min(added)]}"] if added else ["[PAD] [PAD]"]
    unk_text = spec["model"].get("unk_token")
    unk = next((i for i, text in by_id.items() if text == unk_text), None) if unk_text else None
    if kind == "char":
        notes.append("characters outside the vocabulary: <|unk|> here, dropped by llama.cpp")
    return GgufVocabulary(kind, tokens, [int(t) for t in types], list(dict.fromkeys(merges)), unk, notes)


def encode_tensor(name: str, array: np.ndarray, gguf_type: str):
    """(data, raw_dtype or None, type name) for one tensor in file type `gguf_type`."""
    import gguf

    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), None, "f32"
    if gguf_type == "f16" or array.shape[-1] % BLOCK:
        return array.astype(np.float16), None, "f16"
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[gguf_type]
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype, gguf_type


def write_gguf(llama, vocab: GgufVocabulary, path: Path, gguf_type: str, name: str, chat_template: str | None) -> dict[str, int]:
    """Write `llama` (a LlamaForCausalLM) with `vocab` as a GGUF file; returns {tensor type: count}."""
    import gguf

    config = llama.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for add, token in ((writer.add_bos_token_id, config.bos_token_id), (writer.add_eos_token_id, config.eos_token_id),
                       (writer.add_pad_token_id, config.pad_token_id), (writer.add_unk_token_id, vocab.unk)):
        if token is not None:
            add(int(token))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    counts: dict[str, int] = {}
    for tensor_name, array in gguf_tensors(llama.state_dict(), config):
        data, raw_dtype, kind = encode_tensor(tensor_name, array, gguf_type)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def gguf_logits(path: str | Path, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of one sequence computed from the GGUF file alone, as llama.cpp's LLAMA graph
    computes them (dequantized weights, adjacent-pair RoPE), in float64 numpy."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    d, eps, base = meta["llama.rope.dimension_count"], meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    n = len(ids)

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    angles = np.arange(n)[:, None] * base ** (-np.arange(0, d, 2) / d)  # [n, d/2]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def rope(x):  # x [n, heads, d]: rotate the pairs (2i, 2i + 1)
        even, odd = x[..., 0::2], x[..., 1::2]
        return np.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(x.shape)

    x = w["token_embd.weight"][ids]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(meta["llama.block_count"]):
        b = {k.split(".", 2)[2]: v for k, v in w.items() if k.startswith(f"blk.{i}.")}
        h = norm(x, b["attn_norm.weight"])
        q = rope((h @ b["attn_q.weight"].T).reshape(n, heads, d))
        k = rope((h @ b["attn_k.weight"].T).reshape(n, kv_heads, d)).repeat(heads // kv_heads, axis=1)
        v = (h @ b["attn_v.weight"].T).reshape(n, kv_heads, d).repeat(heads // kv_heads, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(n, heads * d) @ b["attn_output.weight"].T
        h = norm(x, b["ffn_norm.weight"])
        gate = h @ b["ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ b["ffn_up.weight"].T)) @ b["ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def probe_ids(config, length: int = 16) -> list[int]:
    rng = np.random.default_rng(0)
    return rng.integers(0, config.vocab_size, min(length, config.max_position_embeddings)).tolist()


def export_gguf_folder(model, model_dir: Path, folder: Path, gguf_type: str = "f16") -> list[str]:
    """Write `model` (a Wiola model that is exactly LLaMA, loaded from `model_dir`) as `folder/model.gguf`, after
    checking it; returns notes for the summary."""
    import torch

    from wiola.export.llama import to_llama

    if gguf_type not in GGUF_TYPES:
        raise WiolaError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
    require_gguf()
    if not (model_dir / "tokenizer.json").is_file():
        raise WiolaError(f"{model_dir} has no tokenizer.json: a GGUF file carries its tokenizer")
    vocab = gguf_vocabulary(model_dir / "tokenizer.json", model.config.vocab_size)
    llama = to_llama(model.float())
    template = model_dir / "chat_template.jinja"
    path = folder / FILE_NAME
    counts = write_gguf(llama, vocab, path, gguf_type, model_dir.name,
                        template.read_text(encoding="utf-8") if template.is_file() else None)
    ids = probe_ids(model.config)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    worst = float(np.abs(gguf_logits(path, ids) - ours).max())
    if gguf_type == "f32" and not worst <= PROBE_TOLERANCE:
        raise WiolaError(f"the GGUF file's logits differ from the model's by {worst:.3g} on a probe sequence; nothing written")
    closeness = (f"its logits agree with PyTorch's to {worst:.1e}" if gguf_type == "f32" else
                 f"its logits within {worst / np.abs(ours).max():.1%} of PyTorch's float32 (largest difference over the largest logit)")
    notes = [f"{FILE_NAME}: {gguf_type}, llama.cpp architecture llama, {model.config.num_hidden_layers} layers, "
             + ", ".join(f"{n} {t} tensors" for t, n in sorted(counts.items())) + f"; {closeness} on the export check",
             f"tokenizer: {vocab.kind} as llama.cpp's gpt2 model (pre-tokenizer gpt-2), no BOS/EOS added", *vocab.notes]
    if gguf_type in ("q8_0", "q4_0") and counts.get("f16"):
        notes.append(f"{counts['f16']} matrices stay f16 (rows not a multiple of {BLOCK})")
    return notes


def export_gguf(checkpoint: str | Path, out: str | Path, gguf_type: str = "f16", force: bool = False, quiet: bool = False) -> list[str]:
    """`wiola export CHECKPOINT OUT --to gguf --gguf-type TYPE` from Python; returns the files written."""
    from wiola.export import export_model

    return export_model(checkpoint, out, "gguf", force=force, quiet=quiet, gguf_type=gguf_type)
