"""`wiola train` on CPU ends by exporting its final model into the ONNX engine's cache (`wiola.train.engine_cache`): the
first `wiola generate` of the output, and `wiola chat`, decode on onnxruntime from the first token without exporting,
under exactly the key generate computes, with the torch engine's text; a LoRA run caches its merged model;
`--no-engine-cache` skips the export, a failed export is one note and not a failed run, only rank 0 of a run on CPU
exports. (The rest of the suite turns the export off with WIOLA_TRAIN_ENGINE_CACHE=0, tests/conftest.py.)"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from wiola.cli import main
from wiola.decode import onnx_backend
from wiola.train import engine_cache
from wiola.train.checkpoint import load_for_inference

from .tinyrun import FAST

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (wiola[export]): the train-end export is not tested")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (wiola[export]): the train-end export is not tested")

TRAIN = [*FAST, "--max-steps", "40", "--eval-every", "40"]
SHORT = [*FAST, "--max-steps", "4", "--eval-every", "4"]
# seeded sampling: greedy decoding of a model this small repeats one token
GENERATE = ["the king", "--temperature", "1", "--seed", "3", "--max-new-tokens", "20", "--device", "cpu"]


def entries(cache: Path) -> list[str]:
    """The exports in an engine cache folder."""
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "shown") \
        if cache.exists() else []


def key_as_generate_loads(out: Path) -> str:
    """The cache key of the model `wiola generate OUT` decodes: loaded the way generate loads it."""
    return onnx_backend.OnnxEngine(load_for_inference(out, torch.device("cpu"))[0]).key


def train(args: list[str], cache: Path, monkeypatch=None, **env) -> tuple[int, str]:
    """`wiola train ARGS` with the export on (unless `env` says otherwise) into `cache`; (exit status, stderr)."""
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WIOLA_ONNX_CACHE", str(cache))
        mp.delenv(engine_cache.ENV, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        with contextlib.redirect_stderr(err):
            code = main(["train", *map(str, args)])
    return code, err.getvalue()


def train_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("wiola train: ")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, model_config):
    """A tiny run trained with the export on: (out, its engine cache, train's stderr)."""
    root = tmp_path_factory.mktemp("engine-cache")
    code, err = train([model_config, dataset, root / "run", *TRAIN], root / "onnx")
    assert code == 0, err
    return root / "run", root / "onnx", err


def watch_engine(monkeypatch) -> list[str]:
    """The cache names `OnnxEngine.start` runs, in order; any export fails the test."""
    starts: list[str] = []
    real_start = onnx_backend.OnnxEngine.start

    def refuse(self):
        raise AssertionError("exported again although wiola train cached the export")

    monkeypatch.setattr(onnx_backend.OnnxEngine, "export", refuse)
    monkeypatch.setattr(onnx_backend.OnnxEngine, "start", lambda self, *a: starts.append(self.name) or real_start(self, *a))
    return starts


def test_the_first_generate_after_train_decodes_on_onnx_from_the_first_token(trained, monkeypatch, capsys):
    out, cache, err = trained
    key = key_as_generate_loads(out)
    assert entries(cache) == [key] and onnx_backend.mismatch(cache / key, key) is None  # exactly generate's key
    lines = train_lines(err)
    assert len(lines) == 1 and lines[0].startswith("wiola train: exported the final model to ONNX for the CPU engine in ")
    assert f" s ({cache / key}): wiola generate on CPU decodes with onnxruntime from the first token" in lines[0]
    monkeypatch.setenv("WIOLA_ONNX_CACHE", str(cache))
    starts = watch_engine(monkeypatch)
    capsys.readouterr()
    assert main(["generate", str(out), *GENERATE, "--engine", "torch"]) == 0
    torch_text = capsys.readouterr().out
    assert starts == [] and len(set(torch_text)) > 10  # a real sample
    assert main(["generate", str(out), *GENERATE]) == 0  # the default engine, auto
    assert starts == [key] and capsys.readouterr().out == torch_text  # onnxruntime from the prompt on, the same tokens


def test_chat_decodes_on_the_engine_generate_chooses(trained, monkeypatch, capsys):
    out, cache, _ = trained
    monkeypatch.setenv("WIOLA_ONNX_CACHE", str(cache))
    starts = watch_engine(monkeypatch)
    args = ["chat", str(out), "--temperature", "1", "--device", "cpu", "--max-new-tokens", "12"]
    chats = "What does the king do?\nAnd then?\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(chats))
    assert main(args) == 0  # --engine auto: the cached export, every turn
    assert starts == [key_as_generate_loads(out)] * 2
    onnx_chat = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(chats))
    assert main([*args, "--engine", "torch"]) == 0
    assert starts == [key_as_generate_loads(out)] * 2 and onnx_chat.count("bot> ") == 2
    assert capsys.readouterr().out == onnx_chat  # the torch engine's replies
    assert main([*args, "--engine", "onnx", "--compile", "on"]) == 2  # generate's option checks, generate's message
    assert capsys.readouterr().err.strip() == \
        "wiola chat: error: --engine onnx does not combine with --compile on (that runs on the torch engine)"


def test_a_lora_run_caches_its_merged_model(trained, dataset, tmp_path, monkeypatch, capsys):
    base, cache, _ = trained
    lora = tmp_path / "lora"
    code, err = train([base, dataset, lora, *SHORT, "--init-from", base, "--lora", "--lora-rank", "4"], cache)
    assert code == 0, err
    merged_key = key_as_generate_loads(lora)  # base + adapter, merged, as generate loads the run
    assert merged_key != key_as_generate_loads(base) and merged_key in entries(cache)
    assert len(train_lines(err)) == 1 and str(cache / merged_key) in train_lines(err)[0]
    monkeypatch.setenv("WIOLA_ONNX_CACHE", str(cache))
    starts = watch_engine(monkeypatch)
    assert main(["generate", str(lora), *GENERATE]) == 0
    assert starts == [merged_key]


def test_no_engine_cache_skips_the_export(dataset, model_config, tmp_path):
    code, err = train([model_config, dataset, tmp_path / "run", *SHORT, "--no-engine-cache"], tmp_path / "onnx",
                      WIOLA_TRAIN_ENGINE_CACHE="1")
    assert code == 0 and entries(tmp_path / "onnx") == [] and train_lines(err) == []
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_env_var_turns_the_export_off_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv(engine_cache.ENV, "0")
    assert not engine_cache.wanted(None) and engine_cache.wanted(True)
    monkeypatch.setenv(engine_cache.ENV, "1")
    assert engine_cache.wanted(None) and not engine_cache.wanted(False)
    monkeypatch.delenv(engine_cache.ENV)
    assert engine_cache.wanted(None)


def test_a_failed_export_is_a_note_not_a_failed_training(dataset, model_config, tmp_path, monkeypatch):
    def fail(self):
        raise RuntimeError("no ONNX op for this\nmore detail")

    monkeypatch.setattr(onnx_backend.OnnxEngine, "export", fail)
    code, err = train([model_config, dataset, tmp_path / "run", *SHORT], tmp_path / "onnx")
    assert code == 0 and (tmp_path / "run" / "model.safetensors").is_file() and entries(tmp_path / "onnx") == []
    assert train_lines(err) == ["wiola train: note: the ONNX export for the CPU engine failed (RuntimeError: no ONNX op for "
                                "this); the model is saved, and wiola generate decodes it on torch"]


def test_only_rank_0_of_a_run_on_cpu_exports(trained, tmp_path, monkeypatch):
    out, _, _ = trained
    monkeypatch.setenv("WIOLA_ONNX_CACHE", str(tmp_path / "onnx"))
    watch_engine(monkeypatch)  # an export would fail the test
    assert engine_cache.cache_final_model(out, "cuda:0") is None and engine_cache.cache_final_model(out, "mps") is None
    monkeypatch.setenv("RANK", "1")
    assert engine_cache.cache_final_model(out, "cpu") is None
    assert entries(tmp_path / "onnx") == []
