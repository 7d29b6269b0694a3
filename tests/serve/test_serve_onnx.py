"""`wiola serve`'s batched decode step on `wiola generate`'s engines (`wiola.serve.steps`): the ONNX export under
onnxruntime, bound to the `SlotCache`'s own buffers, gives every request the tokens of the torch-eager engine —
greedy and seeded sampling, rows joining, leaving and shifting mid-flight — for every family; `--engine auto` serves on
onnxruntime exactly when the export is cached; a missing onnxruntime, a failed export or an export whose state is not
the serving cache's serve on torch with one note; the startup line and `/health` name the engine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.train.tinyrun import FAMILIES
from wiola.decode import onnx_backend

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (wiola[export]): the ONNX engine is not tested")

ROOT = Path(__file__).resolve().parents[2]
CAPACITY = 64


def load(model_dir):
    from wiola.train.checkpoint import load_for_inference

    return load_for_inference(model_dir, torch.device("cpu"))[:2]


def export(model) -> None:
    """Place the model's export in the engine cache (as `wiola train` on CPU or `wiola export --to onnx` would)."""
    engine = onnx_backend.OnnxEngine(model)
    if not engine.cached():
        engine.export()


def requests(tok, n: int = 12, seed: int = 2):
    """n prompts of 1..33 random tokens with mixed greedy / seeded sampled parameters that fit `CAPACITY` slots."""
    from wiola.serve.engine import SamplingParams

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, len(tok), (int(torch.randint(1, 34, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    params = [SamplingParams(max_tokens=int(torch.randint(1, CAPACITY - len(p) + 1, (1,), generator=g)), temperature=0 if i % 2 else 0.9,
                             top_k=20 if i % 4 == 0 else None, top_p=0.9 if i % 4 == 2 else None, seed=i, ignore_eos=i % 3 == 0)
              for i, p in enumerate(prompts)]
    return prompts, params


def serve_all(model, tok, prompts, params, batch: int = 5, **engine_options):
    """Every request through one engine whose queue fills before it starts (rows join and leave as others finish);
    returns (results, stats)."""
    from wiola.serve.engine import Engine

    engine = Engine(model, tok, max_batch_size=batch, max_queue=len(prompts), capacity=CAPACITY, **engine_options).start()
    engine.pause()
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(engine.generate, p, s) for p, s in zip(prompts, params)]
            while engine.stats()["waiting"] < len(prompts):
                time.sleep(0.01)
            engine.resume()
            results = [f.result(120) for f in futures]
        return results, engine.stats()
    finally:
        engine.stop()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_decode_steps_give_every_request_the_torch_tokens(model_dirs, family):
    """12 mixed greedy / seeded sampled requests on a tight 64-slot cache (rows shift right for longer prompts and left
    to reclaim slots; ATM rows move whole): the onnx engine's tokens are the torch engine's, request for request."""
    model, tok = load(model_dirs(family))
    export(model)
    prompts, params = requests(tok)
    expected, torch_stats = serve_all(model, tok, prompts, params, engine="torch")
    got, stats = serve_all(model, tok, prompts, params)  # auto: the export is cached
    assert torch_stats["engine"] == "torch" and stats["engine"] == "onnx"
    assert got == expected
    assert stats["shifts"] >= 2 and stats["mean_batch"] > 2 and stats["steps"] == torch_stats["steps"]
    assert len({tuple(tokens) for tokens, _, _ in expected}) > len(expected) // 2  # real, mostly distinct sequences


def test_auto_serves_on_onnx_exactly_when_the_export_is_cached(model_dirs, monkeypatch, tmp_path):
    from wiola.serve.engine import Engine

    monkeypatch.setenv("WIOLA_ONNX_CACHE", str(tmp_path / "onnx"))
    model, tok = load(model_dirs("seed"))
    calls = []
    real = onnx_backend.OnnxEngine.export
    monkeypatch.setattr(onnx_backend.OnnxEngine, "export", lambda self: calls.append(self.name) or real(self))
    engine = Engine(model, tok, max_batch_size=2, capacity=CAPACITY)
    assert engine.engine == "torch" and "no ONNX export of this model in the engine cache" in engine.engine_reason
    assert calls == [] and len(engine.slots.sets) == 1  # auto never exports; torch keeps one buffer set
    engine = Engine(model, tok, max_batch_size=2, capacity=CAPACITY, engine="onnx")  # asked for by name: exports once
    assert engine.engine == "onnx" and engine.engine_reason == "this model's ONNX export is exported just now" and len(calls) == 1
    engine = Engine(model, tok, max_batch_size=2, capacity=CAPACITY)
    assert engine.engine == "onnx" and engine.engine_reason == "this model's ONNX export is in the engine cache" and len(calls) == 1
    assert engine.stats()["engine"] == "onnx"
    assert Engine(model, tok, max_batch_size=2, capacity=CAPACITY, engine="torch").engine == "torch"


def test_missing_onnxruntime_or_a_failed_export_serves_on_torch_with_one_note(model_dirs, monkeypatch, tmp_path):
    from wiola.errors import WiolaError
    from wiola.serve.engine import Engine

    monkeypatch.setenv("WIOLA_ONNX_CACHE", str(tmp_path / "onnx"))
    model, tok = load(model_dirs("all-off"))
    prompts, params = requests(tok, n=4)
    expected, _ = serve_all(model, tok, prompts, params, batch=2, engine="torch")
    real = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
        notes = []
        engine = Engine(model, tok, max_batch_size=2, capacity=CAPACITY, engine="onnx", note=notes.append)
        assert engine.engine == "torch" and notes == [
            "note: onnxruntime is not installed (pip install 'wiola[export]' for the faster ONNX engine on CPU); decode steps run on torch"]
        notes = []
        assert Engine(model, tok, max_batch_size=2, capacity=CAPACITY, note=notes.append).engine == "torch" and notes == []  # auto: quiet
        with pytest.raises(WiolaError, match="int4 needs the onnx engine, and onnxruntime is not installed"):
            Engine(model, tok, max_batch_size=2, capacity=CAPACITY, quantize="int4")

    def broken(*args, **kwargs):
        raise RuntimeError("no ONNX op for this\nsecond line of the exporter's report")

    monkeypatch.setattr("wiola.export.to_onnx.export_onnx", broken)
    notes = []
    got, stats = serve_all(model, tok, prompts, params, batch=2, engine="onnx", note=notes.append)
    assert stats["engine"] == "torch" and got == expected
    assert notes[-1] == "note: the ONNX export failed (RuntimeError: no ONNX op for this); decode steps run on torch"
    assert len(notes) == 2 and notes[0].startswith("exporting the model to ONNX")  # the announcement, then the one note


def test_an_export_whose_state_is_not_the_serving_cache_serves_on_torch(model_dirs, monkeypatch):
    """The state layout is checked name by name, shape by shape before the first step: a session whose state differs
    (here another family's export: GSA sums the all-off cache lacks) serves on torch with one note."""
    from wiola.serve import steps
    from wiola.serve.engine import Engine
    from wiola.serve.slots import SlotCache

    seed_model, _ = load(model_dirs("seed"))
    export(seed_model)
    seed_session = onnx_backend.OnnxEngine(seed_model).session()
    model, tok = load(model_dirs("all-off"))
    export(model)
    problem = steps.layout_problem(seed_session, SlotCache(model, 2, CAPACITY, sets=2))
    assert problem == "the serving cache has no buffer for the step's state '0.gsa_sum'"
    assert steps.layout_problem(onnx_backend.OnnxEngine(model).session(), SlotCache(model, 2, CAPACITY, sets=2)) is None
    monkeypatch.setattr(onnx_backend.OnnxEngine, "session", lambda self: seed_session)
    notes = []
    engine = Engine(model, tok, max_batch_size=2, capacity=CAPACITY, note=notes.append)
    assert engine.engine == "torch" and notes == [f"note: this model's serving cache does not match its ONNX step ({problem}); "
                                                  "decode steps run on torch"]


def test_quantized_decode_steps_are_batch_invariant(model_dirs):
    """--quantize int8 on the onnx engine: requests batched with others get the tokens they get alone."""
    model, tok = load(model_dirs("seed"))
    prompts, params = requests(tok, n=6, seed=5)
    alone, stats = serve_all(model, tok, prompts, params, batch=1, quantize="int8")
    together, batched = serve_all(model, tok, prompts, params, batch=4, quantize="int8")
    assert stats["engine"] == batched["engine"] == "onnx" and batched["mean_batch"] > 1.5
    assert together == alone


def test_the_startup_line_and_health_name_the_engine(model_dirs, tmp_path):
    """`wiola serve` with the export cached (`wiola export --to onnx` put it there): the startup line says the decode
    steps run on onnxruntime and why, `/health` reports it; `--engine torch --quantize int4` is a one-line error."""
    model_dir = model_dirs("seed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "WIOLA_ONNX_CACHE": str(tmp_path / "onnx")}
    wiola = [sys.executable, "-m", "wiola"]
    done = subprocess.run([*wiola, "serve", str(model_dir), "--engine", "torch", "--quantize", "int4"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "wiola serve: error: --quantize int4 runs on the onnx engine only; it does not combine with --engine torch"]
    subprocess.run([*wiola, "export", str(model_dir), str(tmp_path / "out"), "--to", "onnx"], check=True, capture_output=True, env=env,
                   timeout=300)
    proc = subprocess.Popen([*wiola, "serve", str(model_dir), "--port", "0", "--max-batch-size", "2", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not lines or not lines[-1].startswith("wiola serve:"):
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        assert lines[-1].rstrip().endswith("decode steps on onnxruntime: this model's ONNX export is in the engine cache)"), lines
        assert len(lines) == 1, lines  # nothing else said
        url = lines[-1].split(" on ")[1].split()[0]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the king", "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["engine"] == "onnx" and health["steps"] >= 1
    finally:
        proc.kill()
        proc.wait()


def test_every_layers_keys_and_values_are_one_tensor_updated_in_place(model_dirs, monkeypatch):
    """The ONNX step writes a layer's new slot into the very buffer it reads: a plain layer's ScatterElements is the
    past keys' only reader, an ATM layer's one-token step reads them only in the Gather of the last group that
    the ScatterElements waits for (`onnx_branch.in_place_names`). So both buffer sets hold every layer's
    keys/values in one tensor (serving prefills on torch, into the current set) and the cache's memory counts
    them once: beyond the torch engine's, only the small state ping-pongs. The export holds the one-token body here
    (what users get; the suite's other exports have the any-length body alone, whose ATM steps rewrite the
    compacted groups and so keep two buffers), and every request still gets the torch engine's tokens."""
    from wiola.serve.engine import Engine

    monkeypatch.setenv("WIOLA_ONNX_ONE_TOKEN_BODY", "1")
    model, tok = load(model_dirs("paper"))  # 3 layers, layer 1 merges
    export(model)
    prompts, params = requests(tok)
    expected, _ = serve_all(model, tok, prompts, params, engine="torch")
    got, stats = serve_all(model, tok, prompts, params)
    assert stats["engine"] == "onnx" and got == expected and stats["shifts"] >= 2
    engine = Engine(model, tok, max_batch_size=2, capacity=CAPACITY)
    a, b = (full.layers for full in engine.slots.sets)
    assert engine.engine == "onnx"
    assert [a[i].keys is b[i].keys and a[i].values is b[i].values for i in range(3)] == [True, True, True]
    torch_engine = Engine(model, tok, max_batch_size=2, capacity=CAPACITY, engine="torch")
    kv = 2 * 2 * model.config.num_key_value_heads * CAPACITY * model.config.head_dim * 4  # one layer's keys + values, 2 rows
    assert 0 < engine.slots.bytes() - torch_engine.slots.bytes() < kv // 4  # the running sums and ATM's pairing state
