"""CPU fast paths of `StaticDecoder` and `wiola generate` (`wiola.decode.caches`, `wiola.quantize`).

Every fp32 path gives exactly the tokens of `model.generate` (greedy, the growing `WiolaCache`) for the
three model families: eager, compiled (traced with `aot_eager`: what inductor would compile, without code
generation), `compile="auto"` (eager on CPU: compiling is opt-in), and one real inductor compile (freezing +
C++ wrapper) at a tiny size, which also writes torch's cache artifacts. The int8 copy runs, leaves the fp32
model alone, and its greedy agreement with fp32 is reported and bounded; bad --quantize values fail with one line.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.train.tinyrun import FAMILIES
from wiola import WiolaConfig, WiolaForCausalLM
from wiola import cpu
from wiola.decode import caches
from wiola.errors import WiolaError
from wiola.decode import StaticDecoder
from wiola.generate import cache_slots
from wiola.quantize import check_quantize, quantize_int8

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 6, 24


def family_model(family: str) -> WiolaForCausalLM:
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                  vocab_size=97, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    fields.update(FAMILIES[family])
    torch.manual_seed(0)
    model = WiolaForCausalLM(WiolaConfig(**fields)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the init, so that every component shows in the logits
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def prompt(batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 97, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def reference(model, ids):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WIOLA_COMPILE_CACHE", str(tmp_path / "compile"))
    torch._dynamo.reset()
    yield tmp_path / "compile"
    torch._dynamo.reset()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_paths_give_the_tokens_of_generate(family):
    model = family_model(family)
    ids = prompt()
    expected = reference(model, ids)
    eager = StaticDecoder(model, max_cache_len=PROMPT + NEW, compile=False)
    assert torch.equal(eager.generate(ids, max_new_tokens=NEW), expected) and eager.last_path == "eager"
    traced = StaticDecoder(model, max_cache_len=PROMPT + NEW, compile=True, backend="aot_eager")
    assert torch.equal(traced.generate(ids, max_new_tokens=NEW), expected) and traced.last_path == "compiled"
    assert torch.equal(traced.generate(ids, max_new_tokens=NEW), expected) and traced.last_path == "compiled"  # compiled once


def test_auto_compiles_on_cpu_only_when_asked(private_cache):
    """`compile="auto"` on CPU decodes eagerly however long the run (no timing, no compile); compile=True compiles."""
    model = family_model("all-off")
    decoder = StaticDecoder(model, max_cache_len=64, backend="aot_eager", engine="torch")
    assert decoder.mode == "off"
    decoder.generate(prompt(), max_new_tokens=64 - PROMPT)
    assert decoder.last_path == "eager" and decoder._compiled is None and decoder.compile_s is None
    assert not private_cache.exists() or list(private_cache.iterdir()) == []  # nothing recorded


def test_inductor_compile_on_cpu_is_exact_and_cached(private_cache):
    """The one real inductor compile (freezing, C++ wrapper) of this file, at a tiny size — in a fresh process,
    as `wiola generate` runs it: inductor's C++ build imports setuptools, whose distutils shim refuses to load
    once another test's import (lm-eval's dependencies) has pulled in the stdlib distutils."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WIOLA_COMPILE_CACHE": str(private_cache)}
    code = "from pathlib import Path; import tests.test_cpu_decode as t; t._inductor_compile_check(Path(%r))" % str(private_cache)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _inductor_compile_check(private_cache: Path) -> None:
    model = family_model("all-off")
    ids = prompt(1)
    expected = reference(model, ids)
    decoder = StaticDecoder(model, max_cache_len=PROMPT + NEW, compile=True)
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected)
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected)
    assert decoder.compile_s > 0 and decoder.last_path == "compiled"
    if hasattr(torch.compiler, "save_cache_artifacts"):
        assert (private_cache / f"{decoder._signature(1)}.bin").is_file()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_int8_copy_runs_and_agrees_with_fp32(family):
    model = family_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = prompt()
    fp32 = StaticDecoder(model, max_cache_len=PROMPT + NEW, compile=False).generate(ids, max_new_tokens=NEW)
    decoder = StaticDecoder(model, max_cache_len=PROMPT + NEW, compile=False, quantize="int8")
    out = decoder.generate(ids, max_new_tokens=NEW)
    quantized = [name for name, m in decoder.eager_model.named_modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
    # AGU/F3N MLPs read their weights directly (sliced levels, the sparse decode path): they stay fp32
    assert "lm_head" in quantized and any("mlp" in name for name in quantized) == (model.config.mlp not in ("agu", "f3n"))
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # the fp32 model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    agreement = (out[:, PROMPT:] == fp32[:, PROMPT:]).float().mean().item()
    print(f"int8 greedy agreement with fp32 ({family}): {agreement:.1%}")
    assert out.shape == fp32.shape and agreement >= 0.25
    # the first token comes straight from the prefill logits, which int8 keeps close to fp32
    with torch.no_grad():
        a, b = model(ids).logits, decoder.eager_model(ids).logits
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_bad_quantize_values_fail_in_one_line(capsys):
    assert check_quantize(None) is None and check_quantize("none") is None and check_quantize("int8") == "int8"
    assert check_quantize("int4") == "int4"  # the onnx engine's (tests/export/test_onnx_quant.py)
    with pytest.raises(WiolaError, match="--quantize must be one of none, int8, int4; got 'int3'"):
        check_quantize("int3")
    with pytest.raises(WiolaError, match="--quantize"):
        StaticDecoder(family_model("all-off"), quantize="fp8")
    from wiola.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "nowhere", "hi", "--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="compile must be"):
        StaticDecoder(family_model("all-off"), compile="sometimes")


def test_threads_respect_the_user_and_cache_slots_bucket(monkeypatch):
    assert cpu.physical_cores() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    assert cpu.cpu_threads() == before  # the user's choice stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        assert 1 <= cpu.cpu_threads() <= max(before, cpu.physical_cores())
    finally:
        torch.set_num_threads(before)
    assert cache_slots(33, 1024) == 256 and cache_slots(300, 1024) == 512 and cache_slots(900, 1000) == 1000


def test_cpu_engines_benchmark_runs_and_reports_ratios(capsys):
    spec = importlib.util.spec_from_file_location("cpu_engines", ROOT / "benchmarks" / "cpu_engines.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["cpu_engines"] = bench
    spec.loader.exec_module(bench)
    engines = ["wiola eager", "wiola int8 eager", "wiola default", "ct2 int8", "onnxruntime", "wiola onnx", "llama twin onnx"]
    rows = bench.main(["--tiny", "--threads", str(torch.get_num_threads()), "--engines", *engines])
    printed = capsys.readouterr().out
    assert "| tiny | 1 | wiola eager |" in printed
    if importlib.util.find_spec("onnxruntime") is not None:  # the exported Wiola model under onnxruntime: its tokens are eager's
        onnx = next(r for r in rows if r["engine"].startswith("onnxruntime") and r["batch"] == 1)
        eager = next(r for r in rows if r["engine"] == "wiola eager" and r["batch"] == 1)
        assert onnx["tokens_per_s"] > 0 and onnx["tokens"] == eager["tokens"]
        # the same engine on the LLaMA twin (every component off, the same parameter budget): its own row, its own tokens
        ours, twin = (next(r for r in rows if r["engine"] == name and r["batch"] == 1) for name in ("wiola onnx", "llama twin onnx"))
        assert twin["tokens_per_s"] > 0 and twin["path"] == "onnx" and twin["tokens"] is None
        assert abs(twin["params"] - ours["params"]) <= 0.02 * ours["params"]
    first = next(r for r in rows if r["engine"].startswith("wiola generate first run") and r["batch"] == 1)
    assert first["path"] == "eager"  # nothing cached: torch eager
    if importlib.util.find_spec("onnxruntime") is not None:  # the export cached: auto runs onnxruntime
        default = next(r for r in rows if r["engine"] == "wiola generate default (auto)" and r["batch"] == 1)
        assert default["export_s"] > 0 and default["path"] == "onnx" and default["tokens"] == eager["tokens"]
        assert "one-off ONNX export" in printed
    if importlib.util.find_spec("ctranslate2") is not None:
        ct2 = next(r for r in rows if r["engine"].startswith("ctranslate2 int8") and r["batch"] == 1)
        assert ct2["tokens_per_s"] > 0 and "| 1.00 |" in printed


def test_compile_cache_follows_the_wiola_cache(monkeypatch, tmp_path):
    """The compile artifacts live in the same cache as the corpora and ONNX exports unless told otherwise."""
    from wiola.decode.onnx_backend import onnx_cache_dir

    monkeypatch.delenv("WIOLA_COMPILE_CACHE", raising=False)
    monkeypatch.delenv("WIOLA_ONNX_CACHE", raising=False)
    monkeypatch.setenv("WIOLA_CACHE", str(tmp_path / "wc"))
    assert caches.compile_cache_dir() == tmp_path / "wc" / "compile"
    assert onnx_cache_dir().parent == caches.compile_cache_dir().parent
    monkeypatch.delenv("WIOLA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert caches.compile_cache_dir() == tmp_path / "xdg" / "wiola" / "compile"
    monkeypatch.setenv("WIOLA_COMPILE_CACHE", str(tmp_path / "own"))
    assert caches.compile_cache_dir() == tmp_path / "own"


def test_cpu_engines_llama_cpp_rows_and_cpu_model(capsys, monkeypatch, tmp_path):
    """The llama.cpp rows: skipped with the build script's name without a build; with one (where it is installed),
    llama-bench timed on the twin's GGUF and each Wiola row set against llama.cpp at its own precision. The CPU
    model heads the output."""
    from wiola.export import llama_cpp

    spec = importlib.util.spec_from_file_location("cpu_engines", ROOT / "benchmarks" / "cpu_engines.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["cpu_engines"] = bench
    spec.loader.exec_module(bench)
    assert bench.llama_cpp_precision("wiola onnx int4") == "q4_0" and bench.llama_cpp_precision("wiola int8 eager") == "q8_0"
    assert bench.llama_cpp_precision("wiola onnx") == "f32"
    engines = ["wiola eager", "llama.cpp f32", "llama.cpp q4_0"]
    built = llama_cpp.find_llama_cpp()
    monkeypatch.setenv("WIOLA_LLAMA_CPP", str(tmp_path / "none"))
    rows = bench.main(["--tiny", "--threads", "1", "--engines", *engines])
    printed = capsys.readouterr().out
    assert printed.startswith("# CPU decoding engines on ") and "logical CPUs" in printed.splitlines()[0]
    skipped = [r for r in rows if r["engine"].startswith("llama.cpp")]
    assert len(skipped) == 4 and all("build_llama_cpp.sh" in r["skipped"] for r in skipped if r["batch"] == 1), skipped
    assert all(r["skipped"] == "skipped: llama-bench times batch 1 only" for r in skipped if r["batch"] == 2)
    if built is None:
        pytest.skip(f"the rows with numbers need a llama.cpp build: {llama_cpp.missing_reason()}")
    monkeypatch.setenv("WIOLA_LLAMA_CPP", str(built))
    rows = bench.main(["--tiny", "--threads", "1", "--engines", *engines])
    printed = capsys.readouterr().out
    timed = {r["engine"]: r for r in rows if r["batch"] == 1}
    assert timed["llama.cpp f32 (llama twin)"]["tokens_per_s"] > 0 and timed["llama.cpp q4_0 (llama twin)"]["tokens_per_s"] > 0
    ratio = timed["wiola eager"]["tokens_per_s"] / timed["llama.cpp f32 (llama twin)"]["tokens_per_s"]
    assert f"| tiny | 1 | wiola eager | {timed['wiola eager']['tokens_per_s']:,.0f} |  | {ratio:.2f} |" in printed
