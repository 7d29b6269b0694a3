"""The ONNX engine of `StaticDecoder` and `wiola generate` (`wiola.decode.onnx_backend`): the cached export under
onnxruntime decodes the tokens of the torch path — greedy, seeded sampling, left padding, end-of-sequence and
streaming — for the seed, paper (ATM forced on), all-off and article families; `engine="auto"` follows one rule
(the cached export and onnxruntime: onnx from the prompt on; else torch eager, nothing exported), `engine="onnx"`
exports once and later runs reuse it, `wiola export --to onnx` fills the cache for the next `wiola generate`; a
missing onnxruntime or a failed export falls back to torch with one line; bad engine choices are one-line errors. A cache folder that is not the
model's export as written (another model's, an edited initializer) is exported again with one note; the same
weights loaded by any path share one cache entry; killed exports' leftovers are pruned."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.export.test_onnx import prompts
from tests.train.tinyrun import FAMILIES
from wiola import WiolaForCausalLM
from wiola.decode import onnx_backend
from wiola.export import to_onnx
from wiola.cli import main
from wiola.errors import WiolaError
from wiola.decode import StaticDecoder
from wiola.generate import generate_command

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (wiola[export]): the ONNX engine is not tested")

NEW = 40
CAPACITY = 11 + NEW  # the prompts() rows are 11 tokens
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=3)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WIOLA_ONNX_CACHE", str(tmp_path / "onnx"))
    return tmp_path / "onnx"


def cached(exports, family: str):
    """The family's saved model, with its export placed in the engine's cache (as a first run would leave it)."""
    src, folder = exports(family)
    model = WiolaForCausalLM.from_pretrained(src).eval()
    key = onnx_backend.model_key(model)
    shutil.copytree(folder, onnx_backend.onnx_cache_dir() / key)
    onnx_backend.seal(onnx_backend.onnx_cache_dir() / key, key)  # the record of what the folder holds, as `OnnxEngine.export` writes it
    return src, model


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.ended = True


def no_export(monkeypatch):
    def refuse(self):
        raise AssertionError("exported again although the export is cached")

    monkeypatch.setattr(onnx_backend.OnnxEngine, "export", refuse)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_engine_decodes_the_torch_tokens(exports, family, monkeypatch):
    _, model = cached(exports, family)
    no_export(monkeypatch)
    ids, mask = prompts()  # row 0 left-padded
    torch_dec = StaticDecoder(model, max_cache_len=CAPACITY, compile=False)
    onnx_dec = StaticDecoder(model, max_cache_len=CAPACITY, engine="onnx")
    expected = torch_dec.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(onnx_dec.generate(ids, mask, max_new_tokens=NEW), expected) and onnx_dec.last_path == "onnx"
    assert len(set(expected[0, 11:].tolist())) > 3  # a real sequence
    # row 0 ends at its 5th new token: pads after it, and the run stops once both rows have ended
    eos = int(expected[0, 11 + 4])
    stop = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=2)
    assert torch.equal(onnx_dec.generate(ids, mask, **stop), torch_dec.generate(ids, mask, **stop))
    # seeded sampling (temperature, top-k, top-p) draws the same tokens from onnxruntime's logits, streamed alike
    streams = Recorder(), Recorder()
    sampled = torch_dec.generate(ids, mask, max_new_tokens=NEW, streamer=streams[0], **SAMPLING)
    assert torch.equal(onnx_dec.generate(ids, mask, max_new_tokens=NEW, streamer=streams[1], **SAMPLING), sampled)
    assert streams[0].chunks == streams[1].chunks and streams[1].ended and not torch.equal(sampled, expected)
    # auto, the export cached: onnxruntime from the prompt on
    auto = StaticDecoder(model, max_cache_len=CAPACITY)
    assert torch.equal(auto.generate(ids, mask, max_new_tokens=NEW, **SAMPLING), sampled) and auto.last_path == "onnx"
    # every layer's keys/values are updated in place by the decode steps (ATM layers': from the first step after
    # the prompt on, their prompt chunk writing the other buffer), so the tokens above came from in-place steps
    session = onnx_backend.OnnxEngine(model).session()
    merging = {f"{i}.{f}" for i in model.config.merge_layers for f in ("keys", "values")} if model.config.atm_threshold < 1.0 else set()
    decode, both = onnx_backend.in_place_state(session, prefill=False), onnx_backend.in_place_state(session)
    assert len(decode) == 2 * model.config.num_hidden_layers and set(decode) - set(both) == merging


def counting_exports(monkeypatch) -> list:
    """Record every `OnnxEngine.export` call (and let it run)."""
    calls, real = [], onnx_backend.OnnxEngine.export

    def export(self):
        calls.append(self.name)
        return real(self)

    monkeypatch.setattr(onnx_backend.OnnxEngine, "export", export)
    return calls


def test_auto_runs_onnx_exactly_when_the_export_is_cached(exports, monkeypatch, private_cache):
    """The rule of `engine="auto"`: nothing cached -> torch eager, no export attempted (whatever an earlier wiola's
    timings ledger says); the export cached -> onnxruntime from the prompt on. --compile on/off pin torch."""
    import json

    src, _ = exports("all-off")
    model = WiolaForCausalLM.from_pretrained(src).eval()
    ids = prompts()[0][1:]  # batch 1
    expected = StaticDecoder(model, max_cache_len=CAPACITY, engine="torch").generate(ids, max_new_tokens=NEW)
    calls = counting_exports(monkeypatch)
    private_cache.mkdir(parents=True)  # an earlier version's ledger: "this model lost hours on torch, export it"
    (private_cache / "records.json").write_text(json.dumps({onnx_backend.model_key(model): {"forgone_s": 1e9}}))
    for _ in range(2):
        decoder = StaticDecoder(model, max_cache_len=CAPACITY)
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "eager"
    assert calls == [] and not onnx_backend.OnnxEngine(model).cached()
    cached(exports, "all-off")
    decoder = StaticDecoder(model, max_cache_len=CAPACITY)
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "onnx"
    batch2 = StaticDecoder(model, max_cache_len=CAPACITY, engine="torch").generate(prompts()[0], max_new_tokens=NEW)
    assert torch.equal(decoder.generate(prompts()[0], max_new_tokens=NEW), batch2) and decoder.last_path == "onnx"
    for compile in (False, True):
        pinned = StaticDecoder(model, max_cache_len=CAPACITY, compile=compile, backend="eager")
        assert pinned.onnx is None and torch.equal(pinned.generate(ids, max_new_tokens=NEW), expected)
        assert pinned.last_path == ("compiled" if compile else "eager")
    assert calls == []


def test_engine_onnx_exports_once_and_auto_then_uses_it(exports, monkeypatch, private_cache):
    src, _ = exports("all-off")
    model = WiolaForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():  # other weights than the cached fixtures': a key of its own
        model.lm_head.weight.mul_(1.01)
    ids = prompts()[0][1:]
    expected = StaticDecoder(model, max_cache_len=CAPACITY, engine="torch").generate(ids, max_new_tokens=NEW)
    calls = counting_exports(monkeypatch)
    decoder = StaticDecoder(model, max_cache_len=CAPACITY, engine="onnx")
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "onnx"
    engine = onnx_backend.OnnxEngine(model)
    assert calls == [engine.key] and engine.cached()
    assert [p.name for p in private_cache.iterdir() if p.name.startswith(".")] == []  # no half-written export left
    # the next runs (new decoders, as new processes would build): auto and onnx find the export, from the prompt on
    for kw in ({}, dict(engine="onnx")):
        decoder = StaticDecoder(model, max_cache_len=CAPACITY, **kw)
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "onnx"
    assert calls == [engine.key]


def test_export_command_fills_the_cache_for_the_next_generate(exports, monkeypatch, private_cache, tmp_path, capsys):
    """`wiola export --to onnx` places its folder in the engine cache: the next `wiola generate` (engine auto) decodes
    on onnxruntime without exporting, the torch engine's text; `--no-engine-cache` leaves the cache alone."""
    src, _ = exports("seed")
    args = ["generate", str(src), "the king", "--greedy", "--max-new-tokens", "20", "--device", "cpu"]
    assert main([*args, "--engine", "torch"]) == 0
    torch_text = capsys.readouterr().out
    assert main(["export", str(src), str(tmp_path / "plain"), "--to", "onnx", "--no-engine-cache"]) == 0
    assert not private_cache.exists() or not any(private_cache.iterdir())
    assert main(["export", str(src), str(tmp_path / "onnx"), "--to", "onnx"]) == 0
    engine = onnx_backend.OnnxEngine(WiolaForCausalLM.from_pretrained(src).eval())
    assert f"placed in the ONNX engine's cache ({engine.folder})" in capsys.readouterr().out
    assert onnx_backend.mismatch(engine.folder, engine.key) is None
    calls, starts = counting_exports(monkeypatch), []
    real_start = onnx_backend.OnnxEngine.start
    monkeypatch.setattr(onnx_backend.OnnxEngine, "start", lambda self, *a: starts.append(self.name) or real_start(self, *a))
    assert main(args) == 0
    assert capsys.readouterr().out == torch_text and starts == [engine.key] and calls == []


def test_export_of_a_cached_model_copies_the_cache_and_checks_it(exports, monkeypatch, private_cache, tmp_path, capsys):
    """With the model's export in the engine cache (as `wiola train` leaves it), `wiola export --to onnx` copies it
    (no trace), checks it against PyTorch and adds the tokenizer; a cached graph edited since is exported again."""
    from wiola.export.onnx_run import onnx_generate

    src, _ = exports("paper")
    assert main(["export", str(src), str(tmp_path / "first"), "--to", "onnx"]) == 0  # traced; fills the cache
    capsys.readouterr()
    calls, traces = counting_exports(monkeypatch), []
    real = to_onnx.export_onnx
    monkeypatch.setattr(to_onnx, "export_onnx", lambda *a, **k: traces.append(1) or real(*a, **k))
    assert main(["export", str(src), str(tmp_path / "again"), "--to", "onnx"]) == 0
    out = capsys.readouterr().out
    model = WiolaForCausalLM.from_pretrained(src).eval()
    engine = onnx_backend.OnnxEngine(model)
    assert f"copied from the ONNX engine's cache ({engine.folder}" in out and "onnxruntime agrees with PyTorch to" in out
    assert traces == [] and calls == []
    first, again = tmp_path / "first", tmp_path / "again"
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in first.iterdir())
    assert [p.name for p in first.iterdir() if (again / p.name).read_bytes() != p.read_bytes()] == [".wiola-convert.json"]  # (its paths)
    ids = prompts()[0]
    expected = StaticDecoder(model, max_cache_len=CAPACITY, engine="torch").generate(ids, max_new_tokens=NEW)
    assert torch.equal(torch.as_tensor(onnx_generate(again, ids, max_new_tokens=NEW)), expected[:, ids.shape[1]:])
    # a cached graph changed after the export fails the cache's check: removed, and traced again
    graph = engine.folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-8] + bytes(8))
    assert main(["export", str(src), str(tmp_path / "third"), "--to", "onnx"]) == 0
    assert traces == [1] and "copied from" not in capsys.readouterr().out


def test_missing_onnxruntime_or_failed_export_falls_back_to_torch(exports, monkeypatch, capsys):
    import importlib.util

    src, _ = exports("all-off")
    model = WiolaForCausalLM.from_pretrained(src).eval()
    ids = prompts()[0]
    expected = StaticDecoder(model, max_cache_len=CAPACITY, engine="torch").generate(ids, max_new_tokens=NEW)
    real = importlib.util.find_spec
    capsys.readouterr()  # (the fixture's save_pretrained progress bars)
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
        decoder = StaticDecoder(model, max_cache_len=CAPACITY, engine="onnx")
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "eager"
        assert capsys.readouterr().err.strip() == ("wiola: note: onnxruntime is not installed, so decoding runs on torch "
                                                   "(pip install 'wiola[export]' for the faster ONNX engine on CPU)")
        assert main(["generate", str(src), "the king", "--greedy", "--max-new-tokens", "8", "--device", "cpu", "--engine", "onnx"]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "onnxruntime is not installed" in err[0]
        generate_auto = ["generate", str(src), "the king", "--greedy", "--max-new-tokens", "8", "--device", "cpu"]
        assert main(generate_auto) == 0  # the default (auto) engine: the hint once per machine, then quiet
        assert [line for line in capsys.readouterr().err.splitlines() if "not installed" in line] == [
            "wiola: note: onnxruntime is not installed, so decoding runs on torch "
            "(pip install 'wiola[export]' for the faster ONNX engine on CPU); shown once"]
        assert main(generate_auto) == 0
        assert "not installed" not in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("no ONNX op for this\nsecond line of the exporter's report")

    monkeypatch.setattr("wiola.export.to_onnx.export_onnx", broken)
    decoder = StaticDecoder(model, max_cache_len=CAPACITY, engine="onnx")
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "eager"
    assert capsys.readouterr().err.strip() == "wiola: note: the ONNX export failed (RuntimeError: no ONNX op for this); decoding on torch"
    engine = onnx_backend.OnnxEngine(model)
    assert not engine.cached()
    # a cached export that onnxruntime cannot load (its record vouches for it, as for an export an older
    # onnxruntime made): one line, torch
    cached(exports, "all-off")
    (engine.folder / "model.onnx").write_bytes(b"not a graph")
    onnx_backend.seal(engine.folder, engine.key)
    decoder = StaticDecoder(model, max_cache_len=CAPACITY, engine="onnx")
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "eager"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wiola: note: onnxruntime could not load {engine.folder} (") and err[0].endswith("(delete that folder to export again)")


def test_generate_command_engines_and_bad_choices(exports, capsys):
    src, _ = cached(exports, "seed")
    common = dict(prompt="the king", max_new_tokens=30, device="cpu", stream=False)
    torch_text = generate_command(str(src), greedy=True, engine="torch", **common)
    assert generate_command(str(src), greedy=True, engine="onnx", **common) == torch_text
    sampled = generate_command(str(src), num_samples=2, engine="torch", **common)
    assert generate_command(str(src), num_samples=2, engine="onnx", **common) == sampled
    capsys.readouterr()
    for extra, message in ((["--compile", "on"], "--engine onnx does not combine with --compile on (that runs on the torch engine)"),
                           (["--decoding", "generate"], "--engine onnx does not combine with --decoding generate (that runs on the torch engine)")):
        assert main(["generate", str(src), "hi", "--device", "cpu", "--engine", "onnx", *extra]) == 2
        assert capsys.readouterr().err.strip() == f"wiola generate: error: {message}"
    with pytest.raises(SystemExit):
        main(["generate", str(src), "hi", "--engine", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    with pytest.raises(WiolaError, match="--engine must be one of auto, torch, onnx; got 'gpu'"):
        generate_command(str(src), engine="gpu", **common)
    model = WiolaForCausalLM.from_pretrained(src)
    with pytest.raises(ValueError, match="engine must be 'auto', 'torch' or 'onnx', got 'gpu'"):
        StaticDecoder(model, engine="gpu")
    with pytest.raises(ValueError, match="int4 weights run on the onnx engine only"):  # (int8 and int4 on onnx: test_onnx_quant.py)
        StaticDecoder(model, engine="torch", quantize="int4")


def test_the_cache_stays_bounded(private_cache, monkeypatch):
    import os

    private_cache.mkdir(parents=True)

    monkeypatch.setattr(onnx_backend, "KEEP_EXPORTS", 2)
    for i in range(4):
        (private_cache / f"key{i}").mkdir()
        os.utime(private_cache / f"key{i}", (1000 + i, 1000 + i))
    os.utime(private_cache / "key0", (5000, 5000))  # the oldest export, used last
    onnx_backend.OnnxEngine(None)._prune(private_cache)
    assert sorted(p.name for p in private_cache.iterdir() if p.is_dir()) == ["key0", "key3"]


def negate_lm_head(folder, model) -> None:
    """Edit one initializer of the cached graph: the output projection (found by its values), negated."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(folder / "model.onnx"))
    head = model.lm_head.weight.detach().numpy()
    init = next(i for i in graph.graph.initializer if any(
        numpy_helper.to_array(i).shape == h.shape and np.array_equal(numpy_helper.to_array(i), h) for h in (head, head.T)))
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(graph, str(folder / "model.onnx"))


def test_an_edited_cached_graph_is_exported_again(exports, capsys):
    """Issue 26, item 1: an initializer edited in the cached graph gives the torch engine's tokens with one note
    (and a fresh export), never the edited graph's."""
    _, model = cached(exports, "all-off")
    engine = onnx_backend.OnnxEngine(model)
    negate_lm_head(engine.folder, model)
    ids = prompts()[0]
    expected = StaticDecoder(model, max_cache_len=CAPACITY, engine="torch").generate(ids, max_new_tokens=NEW)
    capsys.readouterr()
    decoder = StaticDecoder(model, max_cache_len=CAPACITY, engine="onnx")
    assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "onnx"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wiola: note: the cached ONNX export {engine.folder} is not this model's "
                                               "(model.onnx changed after the export); exporting it again (about "), err
    assert onnx_backend.mismatch(engine.folder, engine.key) is None  # exported afresh


def test_an_unchanged_cached_folder_is_not_hashed_again(exports, monkeypatch):
    """The check of a cached folder reads each file's identity (size, times, inode) against its record, and hashes
    only the files whose identity changed: none here."""
    _, model = cached(exports, "all-off")
    engine = onnx_backend.OnnxEngine(model)
    record = json.loads((engine.folder / onnx_backend.RECORD).read_text())
    assert set(record["identity"]) == set(record["sha256"]) and "model.onnx" in record["identity"]
    hashed = []
    real = onnx_backend._sha256
    monkeypatch.setattr(onnx_backend, "_sha256", lambda path: hashed.append(path.name) or real(path))
    assert onnx_backend.mismatch(engine.folder, engine.key) is None and hashed == []
    (engine.folder / "wiola_onnx.json").touch()  # a new modification time: that file alone is hashed again (same bytes)
    assert onnx_backend.mismatch(engine.folder, engine.key) is None and hashed == ["wiola_onnx.json"]
    assert onnx_backend.mismatch(engine.folder, engine.key) is None and hashed == ["wiola_onnx.json"]  # its new identity kept
    old = json.loads((engine.folder / onnx_backend.RECORD).read_text())
    del old["identity"]  # a record from before identities were kept: every file hashed once, then recorded
    (engine.folder / onnx_backend.RECORD).write_text(json.dumps(old))
    hashed.clear()
    assert onnx_backend.mismatch(engine.folder, engine.key) is None and sorted(hashed) == sorted(record["sha256"])
    assert onnx_backend.mismatch(engine.folder, engine.key) is None and sorted(hashed) == sorted(record["sha256"])
    assert sorted(p.name for p in engine.folder.iterdir()) == sorted([*record["sha256"], onnx_backend.RECORD])


def test_an_edit_with_its_times_set_back_is_still_caught(exports):
    """An initializer edited in place, same size, with the file's modification time set back to the recorded one:
    the change time moved (no program can set it back), so the file is hashed and the edit found."""
    _, model = cached(exports, "all-off")
    engine = onnx_backend.OnnxEngine(model)
    graph = engine.folder / "model.onnx"
    before = graph.stat()
    with open(graph, "r+b") as f:  # one byte of the weights, flipped in place
        f.seek(before.st_size // 2)
        byte = f.read(1)[0]
        f.seek(before.st_size // 2)
        f.write(bytes([byte ^ 0x80]))
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = graph.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert onnx_backend.mismatch(engine.folder, engine.key) == "model.onnx changed after the export"


def test_another_models_cached_export_is_exported_again(exports, char_tokenizer, tmp_path, capsys):
    """Issue 26, item 1: model B (the shapes of A, other weights) finds A's export under its key: `wiola generate`
    (engine auto) says so in one line, removes it and prints the torch engine's text, not A's; `--engine onnx`
    then exports B."""
    from tests.export.conftest import save_model

    _, model = cached(exports, "all-off")
    engine = onnx_backend.OnnxEngine(model)
    src_b = save_model(tmp_path / "b", char_tokenizer, "all-off", seed=1)
    engine_b = onnx_backend.OnnxEngine(WiolaForCausalLM.from_pretrained(src_b).eval())
    shutil.copytree(engine.folder, engine_b.folder)
    args = ["generate", str(src_b), "the king", "--greedy", "--max-new-tokens", str(NEW), "--device", "cpu"]
    assert main([*args, "--engine", "torch"]) == 0
    torch_text = capsys.readouterr().out
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == torch_text
    notes = [line for line in err.splitlines() if "ONNX export" in line]
    assert notes == [f"wiola: note: the cached ONNX export {engine_b.folder} is not this model's (it holds the export of "
                     f"other weights (key {engine.key})); decoding on torch (wiola export --to onnx, or --engine onnx, makes it again)"], err
    assert not engine_b.folder.exists()
    assert main([*args, "--engine", "onnx"]) == 0
    assert capsys.readouterr().out == torch_text and onnx_backend.mismatch(engine_b.folder, engine_b.key) is None


def test_the_same_weights_share_one_cache_entry_whatever_the_path(exports, tmp_path, monkeypatch, private_cache):
    """Issue 26, item 6: `runs/seed`, `/abs/runs/seed` and `runs/seed/checkpoints/final` (the same weights) have one
    ONNX cache key and one compile signature, and all three decode from one cached export."""
    from wiola.decode import caches

    src, _ = cached(exports, "all-off")
    run = tmp_path / "runs" / "seed"
    shutil.copytree(src, run)
    shutil.copytree(src, run / "checkpoints" / "final")
    monkeypatch.chdir(tmp_path)
    models = [WiolaForCausalLM.from_pretrained(path).eval() for path in ("runs/seed", str(run), "runs/seed/checkpoints/final")]
    assert len({onnx_backend.model_key(m) for m in models}) == 1
    assert len({caches.signature(m, 1, CAPACITY, None, 1) for m in models}) == 1
    no_export(monkeypatch)
    ids = prompts()[0]
    expected = StaticDecoder(models[0], max_cache_len=CAPACITY, engine="torch").generate(ids, max_new_tokens=NEW)
    for m in models:
        decoder = StaticDecoder(m, max_cache_len=CAPACITY, engine="onnx")
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW), expected) and decoder.last_path == "onnx"
    assert len([p for p in private_cache.iterdir() if p.is_dir() and p.name != "shown"]) == 1


def test_killed_exports_leftovers_are_pruned(private_cache):
    """The minor item of issue 26: a killed export's `.KEY-PID-xxxx/` folder and an earlier version's killed ledger
    write's `records.PID.tmp` are removed once their writer is gone (or, whatever the PID, once a day old); a live
    writer's stay."""
    import os
    import subprocess
    import sys
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    key = "0123456789abcdef01234567"
    made = {f".{key}-{gone.pid}-k1l2m3n4": 20 * 60,  # dead writer, 20 minutes old: removed
            f".{key}-{gone.pid}-fresh123": 5,  # dead writer, seconds old: kept (it may be another namespace's live one)
            f".{key}-{os.getpid()}-live1234": 20 * 60,  # live writer: kept
            f".{key}-oldstyle": 2 * 24 * 3600,  # no PID (an earlier wiola's name), two days old: removed
            f".{key}-newstyle": 20 * 60,  # no PID, 20 minutes: kept
            f"records.{gone.pid}.tmp": 20 * 60,  # a ledger write killed before its rename: removed
            f"records.{os.getpid()}.tmp": 20 * 60,  # kept
            key: 3 * 24 * 3600, "shown": 3 * 24 * 3600}  # an export and the hints' markers: kept
    private_cache.mkdir(parents=True)
    for name, age in made.items():
        path = private_cache / name
        if name.endswith(".tmp"):
            path.write_text("{}")
        else:
            path.mkdir()
            (path / "model.onnx").write_bytes(b"partial")
        os.utime(path, (now - age, now - age))
    onnx_backend.OnnxEngine(None)._prune(private_cache)
    assert sorted(p.name for p in private_cache.iterdir()) == sorted(
        [f".{key}-{gone.pid}-fresh123", f".{key}-{os.getpid()}-live1234", f".{key}-newstyle", f"records.{os.getpid()}.tmp", key, "shown"])
