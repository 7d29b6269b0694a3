"""`wiola export --to gguf` without llama.cpp: the file's metadata and tensors (read back with gguf-py), a forward
pass computed from the file alone against transformers' LLaMA, the tokenizer description, the quantized types,
and the refusals (tests/export/test_gguf_llama_cpp.py runs the files in llama.cpp itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.export.conftest import VOCAB, save_model
from wiola.cli import main
from wiola.errors import WiolaError
from wiola.export import export_gguf, export_model

gguf = pytest.importorskip("gguf", reason="the gguf package (wiola[export]) is not installed")

from wiola.export.gguf import byte_level_alphabet, gguf_logits, gguf_vocabulary, interleave_rotary  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, char_tokenizer):
    """All-off, GQA 4/2, untied head, 64 embedding rows for a ~40-token character tokenizer."""
    return save_model(tmp_path_factory.mktemp("gguf") / "model", char_tokenizer, "all-off", tie_word_embeddings=False)


def read(path):
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return meta, tensors


def llama_of(model_dir):
    from wiola import WiolaForCausalLM
    from wiola.export.llama import to_llama

    return to_llama(WiolaForCausalLM.from_pretrained(model_dir).eval())


def test_metadata_tensor_names_and_rotary_layout(model_dir, tmp_path):
    written = export_gguf(model_dir, tmp_path / "out", gguf_type="f32", quiet=True)
    assert written == ["model.gguf"]
    meta, tensors = read(tmp_path / "out" / "model.gguf")
    llama = llama_of(model_dir)
    c = llama.config
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (2, 32, 64)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.rope.dimension_count"]) == (4, 2, 8)
    assert meta["llama.context_length"] == c.max_position_embeddings and meta["llama.vocab_size"] == VOCAB
    assert meta["llama.rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert (meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.padding_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (0, 1, 2, 3)
    per_layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    state = llama.state_dict()
    q = state["model.layers.1.self_attn.q_proj.weight"].numpy()
    stored = np.asarray(tensors["blk.1.attn_q.weight"].data)
    np.testing.assert_array_equal(stored, interleave_rotary(q, 4))
    # head 2's rows: llama.cpp's adjacent pair (2i, 2i + 1) is transformers' half-split pair (i, i + d/2)
    for i in range(4):
        np.testing.assert_array_equal(stored[2 * 8 + 2 * i], q[2 * 8 + i])
        np.testing.assert_array_equal(stored[2 * 8 + 2 * i + 1], q[2 * 8 + 4 + i])
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.ffn_down.weight"].data), state["model.layers.0.mlp.down_proj.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), state["lm_head.weight"].numpy())


@pytest.mark.parametrize("gguf_type, tolerance", [("f32", 1e-4), ("f16", 0.02), ("q8_0", 0.1)])
def test_forward_pass_from_the_file_equals_transformers_llama(model_dir, tmp_path, gguf_type, tolerance):
    """The logits computed from the GGUF tensors alone (dequantized, llama.cpp's adjacent-pair RoPE) equal
    transformers' LlamaForCausalLM's: to 1e-4 in f32, within a few per cent of the largest logit quantized."""
    export_gguf(model_dir, tmp_path / "out", gguf_type=gguf_type, quiet=True)
    ids = [5, 9, 17, 42, 3, 30, 11, 11, 7, 25, 38, 4]
    with torch.no_grad():
        expected = llama_of(model_dir)(torch.tensor([ids])).logits[0].double().numpy()
    got = gguf_logits(tmp_path / "out" / "model.gguf", ids)
    assert np.abs(got - expected).max() <= tolerance * (1 if gguf_type == "f32" else np.abs(expected).max())


def test_tied_embeddings_leave_out_the_output_tensor(tmp_path, char_tokenizer):
    src = save_model(tmp_path / "model", char_tokenizer, "all-off", tie_word_embeddings=True)
    export_gguf(src, tmp_path / "out", gguf_type="f32", quiet=True)
    _, tensors = read(tmp_path / "out" / "model.gguf")
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def test_quantized_types_and_rows_that_stay_f16(tmp_path, char_tokenizer, capsys):
    """q4_0 blocks rows of 32: intermediate size 48 makes ffn_down's rows 48 long, which stays f16, said in the summary."""
    src = save_model(tmp_path / "model", char_tokenizer, "all-off", intermediate_size=48)
    export_gguf(src, tmp_path / "out", gguf_type="q4_0")
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "2 matrices stay f16 (rows not a multiple of 32)" in summary
    meta, tensors = read(tmp_path / "out" / "model.gguf")
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"


def merge_like_llama_cpp(symbols: list[str], merges: list[str]) -> list[str]:
    """BPE on one word: repeatedly join the adjacent pair of lowest merge rank."""
    rank = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    while True:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        best = min(pairs, default=(len(rank), -1))
        if best[0] == len(rank):
            return symbols
        i = best[1]
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]


def test_character_vocabulary_in_byte_level_form(tmp_path):
    """Each character becomes its UTF-8 bytes in GPT-2's byte alphabet, and the merges join exactly those bytes
    back into that character's token, for 1- to 4-byte characters; control tokens and unused rows as llama.cpp reads them."""
    from wiola.data.tokenizer import save_tokenizer, train_tokenizer

    folder = save_tokenizer(train_tokenizer(["a b\tc\n'é' ☺ 😀 ü日"], kind="char"), tmp_path / "tok")
    vocab = gguf_vocabulary(folder / "tokenizer.json", 40)
    spec = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == sorted(set(alphabet.values())) and alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ"
    for char, i in spec.items():
        if i < 4:
            assert vocab.tokens[i] == char and vocab.types[i] == gguf.TokenType.CONTROL
            continue
        symbols = [alphabet[b] for b in char.encode("utf-8")]
        assert merge_like_llama_cpp(symbols, vocab.merges) == [vocab.tokens[i]] == ["".join(symbols)]
    assert vocab.tokens[len(spec)] == f"[PAD{len(spec)}]" and vocab.types[-1] == gguf.TokenType.UNUSED
    assert vocab.unk == 3 and vocab.kind == "char"


def test_byte_level_bpe_vocabulary_is_ours(tmp_path):
    from wiola.data.tokenizer import save_tokenizer, train_tokenizer
    from tests.train.tinyrun import corpus

    folder = save_tokenizer(train_tokenizer(corpus(40, 0), kind="bpe", vocab_size=300), tmp_path / "tok")
    spec = json.loads((folder / "tokenizer.json").read_text())["model"]
    vocab = gguf_vocabulary(folder / "tokenizer.json", 320)
    assert vocab.kind == "bpe" and vocab.unk is None and len(vocab.tokens) == 320
    assert all(vocab.tokens[i] == text for text, i in spec["vocab"].items())
    assert vocab.merges == [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]


def test_refusals_are_one_line_and_write_nothing(tmp_path, char_tokenizer, model_dir, capsys):
    seed = save_model(tmp_path / "seed", char_tokenizer, "seed")
    cases = [
        ([str(seed), str(tmp_path / "o1"), "--to", "gguf"], "not a LLaMA model: position_encoding=spiral (spiral_alpha != 0); attention_gate=gsa"),
        ([str(model_dir), str(tmp_path / "o2"), "--to", "gguf", "--quantize", "int8"], "a GGUF file takes --gguf-type (q8_0 is the GGUF counterpart of int8)"),
        ([str(model_dir), str(tmp_path / "o3"), "--to", "llama", "--gguf-type", "q8_0"], "--gguf-type applies to --to gguf, not --to llama"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    with pytest.raises(SystemExit) as exited:  # argparse's own check of the choices
        main(["export", str(model_dir), str(tmp_path / "o4"), "--to", "gguf", "--gguf-type", "q5_k"])
    assert exited.value.code == 2 and "invalid choice: 'q5_k'" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (foreign / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(WiolaError, match="neither a byte-level BPE nor a character tokenizer as wiola trains them"):
        gguf_vocabulary(foreign / "tokenizer.json", VOCAB)


def test_a_failed_check_leaves_out_as_it_was(model_dir, tmp_path, monkeypatch):
    """Without the rotary reordering the file computes something else: the export check refuses it, and OUT keeps
    what it had (the file is written next to OUT and swapped in only after the check)."""
    import wiola.export.gguf as module

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(module, "interleave_rotary", lambda weight, heads: weight)
    with pytest.raises(WiolaError, match="the GGUF file's logits differ from the model's by .* on a probe sequence; nothing written"):
        export_model(model_dir, out, "gguf", force=True, gguf_type="f32")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out.convert-*"))


def test_llama_cpp_build_is_found_where_the_build_script_puts_it(tmp_path, monkeypatch):
    from wiola.export import llama_cpp

    monkeypatch.setenv("WIOLA_LLAMA_CPP", str(tmp_path / "build"))
    assert llama_cpp.llama_cpp_root() == tmp_path / "build" and llama_cpp.find_llama_cpp() is None
    assert "bash scripts/build_llama_cpp.sh" in llama_cpp.missing_reason() and str(tmp_path / "build") in llama_cpp.missing_reason()
    with pytest.raises(WiolaError, match="no llama.cpp build in"):
        llama_cpp.binary("llama-bench")
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "build" / "VERSION").write_text("llama_cpp_python-0.3.36.tar.gz\n")
    assert llama_cpp.find_llama_cpp() == tmp_path / "build"
    monkeypatch.delenv("WIOLA_LLAMA_CPP")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert llama_cpp.llama_cpp_root() == tmp_path / "cache" / "wiola" / "llama.cpp"
