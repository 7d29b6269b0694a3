"""`wiola export --to gguf` against llama.cpp itself, on LLaMA-equivalent models trained here for a few hundred
steps on tinyshakespeare (a character and a byte-level BPE tokenizer): llama.cpp's tokens for a text equal ours,
and its greedy tokens equal our torch path's (`StaticDecoder`); and llama.cpp's own converter on `--to llama`
output, which reads everything but a newly trained tokenizer. Skipped, with a message, without a llama.cpp build
(`bash scripts/build_llama_cpp.sh`; `wiola.export.llama_cpp`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from wiola.export import llama_cpp

pytestmark = pytest.mark.skipif(llama_cpp.find_llama_cpp() is None, reason=llama_cpp.missing_reason())

CORPUS = Path(__file__).resolve().parents[2] / "corpora" / "tinyshakespeare.txt"
HOSTILE = ("  Hello,   world!!\n\n\tI'm 12345 and 3.14159 — ünïcödé 日本語 😀👍🏽 it's  'quoted' don't we'll\r\n   "
           "x  \n  END   ")
PROMPTS = ["ROMEO:\nWhat light", "First Citizen:\nWe are accounted poor citizens, the patricians good.", "KING"]
NEW = 48
STEPS = int(os.environ.get("WIOLA_GGUF_TRAIN_STEPS", "300"))


def train_llama_equivalent(folder: Path, kind: str, tie: bool) -> Path:
    """An all-off (LLaMA) Wiola model trained for `STEPS` steps on tinyshakespeare with a `kind` tokenizer (the
    character one also sees `HOSTILE`, so that every character of it is in the vocabulary), saved with its tokenizer."""
    from wiola import WiolaConfig, WiolaForCausalLM
    from wiola.data.tokenizer import save_tokenizer, train_tokenizer

    text = CORPUS.read_text(encoding="utf-8")
    docs = text.split("\n\n")
    tokenizer = train_tokenizer(docs + ([HOSTILE] if kind == "char" else []), kind=kind, vocab_size=512)
    ids = torch.tensor(tokenizer(text).input_ids)
    config = WiolaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = WiolaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g)
        batch = torch.stack([ids[s:s + 65] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    (folder / "final_loss.txt").write_text(f"{loss.item():.4f}\n")
    return folder


@pytest.fixture(scope="module", params=["char", "bpe"])
def trained(request, tmp_path_factory):
    kind = request.param
    return train_llama_equivalent(tmp_path_factory.mktemp(f"gguf-{kind}") / "model", kind, tie=kind == "bpe")


def torch_greedy(folder: Path, prompt: str, new: int = NEW) -> list[int]:
    from wiola import WiolaForCausalLM
    from wiola.data.tokenizer import load_tokenizer
    from wiola.decode import StaticDecoder

    model = WiolaForCausalLM.from_pretrained(folder).eval()
    ids = load_tokenizer(folder)(prompt, return_tensors="pt").input_ids
    out = StaticDecoder(model, max_cache_len=ids.shape[1] + new, engine="torch").generate(ids, max_new_tokens=new)
    return out[0, ids.shape[1]:].tolist()


def ours_tokenize(folder: Path, text: str) -> list[int]:
    """What `wiola generate` encodes a prompt with."""
    from wiola.data.tokenizer import load_tokenizer

    return load_tokenizer(folder)(text).input_ids


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_0"])
def test_llama_cpp_tokens_and_greedy_tokens_equal_ours(trained, gguf_type, tmp_path):
    """Tokenization equal for every type. Greedy tokens: f32 and f16 equal ours (48 free-running tokens per prompt).
    q8_0 (8-bit weights, and llama.cpp quantizes the activations to 8 bits too) moves the logits by ~1% of their
    range, so free-running equality lasts until a near-tie; what is required is that along our greedy sequence
    (teacher-forced) its logits stay within 3% of the largest logit of ours and its choice equals ours wherever
    our best two logits are more than that apart. q4_0: agreement printed, not required."""
    from wiola import WiolaForCausalLM
    from wiola.export.gguf import export_gguf

    export_gguf(trained, tmp_path / "gguf", gguf_type=gguf_type, quiet=True)
    model = WiolaForCausalLM.from_pretrained(trained).eval()
    agree = []
    with llama_cpp.LlamaCpp(tmp_path / "gguf" / "model.gguf") as engine:
        for text in [HOSTILE, CORPUS.read_text(encoding="utf-8")[:20000], *PROMPTS, "<|bos|>ROMEO<|eos|>"]:
            assert engine.tokenize(text) == ours_tokenize(trained, text)
        for prompt in PROMPTS:
            ids, expected = ours_tokenize(trained, prompt), torch_greedy(trained, prompt)
            got = engine.greedy(ids, NEW)
            agree.append(first_difference(got, expected))
            if gguf_type in ("f32", "f16"):
                assert got == expected, (prompt, got, expected)
            elif gguf_type == "q8_0":
                with torch.no_grad():
                    ours = model(torch.tensor([ids + expected])).logits[0, len(ids) - 1:-1]
                theirs = torch.tensor(engine.follow(ids, expected))
                tolerance = 0.03 * float(ours.abs().max())
                assert float((theirs - ours).abs().max()) <= tolerance
                top2 = ours.topk(2).values
                clear = (top2[:, 0] - top2[:, 1]) > tolerance
                assert torch.equal(theirs.argmax(-1)[clear], ours.argmax(-1)[clear])
    print(f"\n{gguf_type} {trained.parent.name}: free-running greedy tokens equal to torch's for the first {agree} of {NEW}")


def test_char_outside_vocabulary_is_dropped_by_llama_cpp(tmp_path, trained):
    """The documented limit: a character the character tokenizer never saw is <|unk|> for us, nothing in llama.cpp."""
    from wiola.data.tokenizer import load_tokenizer
    from wiola.export.gguf import export_gguf

    tokenizer = load_tokenizer(trained)
    if tokenizer.unk_token is None:
        pytest.skip("the byte-level BPE has no unknown characters")
    export_gguf(trained, tmp_path / "gguf", gguf_type="f32", quiet=True)
    text = "ROMEO 中 ☃ wherefore"
    ours = tokenizer(text).input_ids
    assert tokenizer.unk_token_id in ours
    with llama_cpp.LlamaCpp(tmp_path / "gguf" / "model.gguf") as engine:
        assert engine.tokenize(text) == [t for t in ours if t != tokenizer.unk_token_id]


CONVERTER_VENV = llama_cpp.llama_cpp_root() / "convert-venv"


def test_llama_cpp_converter_reads_the_llama_folder_up_to_the_tokenizer(trained, tmp_path, capsys):
    """llama.cpp's convert_hf_to_gguf.py (with its pinned transformers 4) on the `--to llama` folder: the tokenizer
    config loads (no `TokenizersBackend`), the weights and config are read, and it stops where docs/export.md says,
    at a BPE vocabulary it does not recognise; `--to llama` says so and points to `--to gguf`."""
    from wiola.export import export_model

    python = CONVERTER_VENV / "bin" / "python"
    if not (CONVERTER_VENV / ".done").is_file():
        pytest.skip(f"no converter venv in {CONVERTER_VENV} (bash scripts/build_llama_cpp.sh --converter makes it)")
    export_model(trained, tmp_path / "hf", "llama")
    assert "convert_hf_to_gguf.py cannot read this tokenizer" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    script = llama_cpp.find_llama_cpp() / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    done = subprocess.run([str(python), str(script), str(tmp_path / "hf"), "--outfile", str(tmp_path / "c.gguf"), "--outtype", "f32"],
                          capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "TokenizersBackend" not in log and "token_embd.weight" in log
    assert "BPE pre-tokenizer was not recognized" in log


def test_llama_bench_runs_on_an_export(tmp_path, char_tokenizer):
    """What benchmarks use: one llama-bench run on a GGUF export, parsed (tiny sizes; nothing timed here)."""
    from tests.export.conftest import save_model
    from wiola.export.gguf import export_gguf

    src = save_model(tmp_path / "model", char_tokenizer, "all-off")
    export_gguf(src, tmp_path / "gguf", gguf_type="q8_0", quiet=True)
    records = llama_cpp.llama_bench(tmp_path / "gguf" / "model.gguf", new_tokens=4, prompt_tokens=4, threads=1)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(0, 4), (4, 4)]
    assert all(r["avg_ts"] > 0 and "Q8_0" in r["model_type"] for r in records)
