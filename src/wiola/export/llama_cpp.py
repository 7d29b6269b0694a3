"""Find a llama.cpp build and run GGUF files with it: the tests and benchmarks use this, nothing else needs it.

`scripts/build_llama_cpp.sh` builds llama.cpp once into `$WIOLA_LLAMA_CPP`, by default
`${XDG_CACHE_HOME:-~/.cache}/wiola/llama.cpp`: `bin/` (llama-bench, llama-quantize, llama-completion, the
shared libraries), `src/` (the llama-cpp-python sdist it came from) and `VERSION`, written last.

* `find_llama_cpp()`: that folder when the build finished (its `VERSION` exists), else None;
  `missing_reason()` the one line to skip or refuse with.
* `LlamaCpp(gguf_path)`: the model loaded through llama.cpp's C API, driven with the sdist's own ctypes
  declarations (`llama_cpp/llama_cpp.py`, loaded alone, so the high-level package's dependencies are not
  needed): `tokenize(text)` (no BOS/EOS, special tokens parsed, as Wiola's tokenizers encode) and
  `greedy(ids, n)` (argmax of llama.cpp's logits at every step: its greedy tokens), `follow(ids, tokens)` (its
  logits along a given continuation).
* `llama_bench(gguf_path, ...)`: one `llama-bench -o json` run, parsed.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import types
from pathlib import Path

from wiola.errors import WiolaError

BUILD_SCRIPT = "scripts/build_llama_cpp.sh"


def llama_cpp_root() -> Path:
    """Where the build lives (or would): $WIOLA_LLAMA_CPP, else the user cache, as the build script decides."""
    if os.environ.get("WIOLA_LLAMA_CPP"):
        return Path(os.environ["WIOLA_LLAMA_CPP"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "wiola" / "llama.cpp"


def find_llama_cpp() -> Path | None:
    """The build folder when a build finished there (`VERSION` exists), else None."""
    root = llama_cpp_root()
    return root if (root / "VERSION").is_file() and (root / "bin").is_dir() else None


def missing_reason() -> str:
    return f"no llama.cpp build in {llama_cpp_root()} (bash {BUILD_SCRIPT} builds one; WIOLA_LLAMA_CPP names another folder)"


def build_version() -> str | None:
    """What the build was made from (the sdist name in its VERSION file), or None without a build."""
    root = find_llama_cpp()
    return None if root is None else (root / "VERSION").read_text().strip()


def binary(name: str) -> Path:
    """Path of a llama.cpp program of the build (llama-bench, llama-quantize, llama-completion)."""
    root = find_llama_cpp()
    if root is None:
        raise WiolaError(missing_reason())
    path = root / "bin" / name
    if not path.is_file():
        raise WiolaError(f"{path} is missing from the llama.cpp build")
    return path


def bindings():
    """The sdist's low-level ctypes module (`llama_cpp.llama_cpp`) bound to the build's libllama."""
    root = find_llama_cpp()
    if root is None:
        raise WiolaError(missing_reason())
    loaded = sys.modules.get("llama_cpp")
    if loaded is None:  # a bare package, so that its __init__ (the high-level API and its dependencies) is not run
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(root / "bin"))
        package = types.ModuleType("llama_cpp")
        package.__path__ = [str(root / "src" / "llama_cpp")]
        sys.modules["llama_cpp"] = package
    import llama_cpp.llama_cpp as low

    return low


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level, text, user_data):  # llama.cpp's log lines (model loading, context sizes) are dropped
    return None


class LlamaCpp:
    """A GGUF model loaded by llama.cpp, on the CPU, one sequence at a time."""

    def __init__(self, gguf_path: str | Path, context: int = 512, threads: int = 1, quiet: bool = True):
        self.low = low = bindings()
        if quiet:
            low.llama_log_set(_quiet, None)
        low.llama_backend_init()
        self.model = low.llama_model_load_from_file(str(gguf_path).encode(), low.llama_model_default_params())
        if not self.model:
            raise WiolaError(f"llama.cpp could not load {gguf_path}")
        params = low.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = context, context, context
        params.n_threads = params.n_threads_batch = threads
        self.context = low.llama_init_from_model(self.model, params)
        if not self.context:
            low.llama_model_free(self.model)
            raise WiolaError(f"llama.cpp could not make a context for {gguf_path}")
        self.vocab = low.llama_model_get_vocab(self.model)
        self.n_vocab = low.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids for `text`: no BOS/EOS added, special tokens' text parsed as the tokens."""
        data = text.encode("utf-8")
        size = len(data) + 8
        buffer = (self.low.llama_token * size)()
        n = self.low.llama_tokenize(self.vocab, data, len(data), buffer, size, False, True)
        if n < 0:
            raise WiolaError(f"llama.cpp could not tokenize the text ({n})")
        return list(buffer[:n])

    def logits(self, ids: list[int], fresh: bool = True) -> list[float]:
        """Feed `ids` (after clearing the cache when `fresh`) and return the last position's logits."""
        low = self.low
        if fresh:
            low.llama_memory_clear(low.llama_get_memory(self.context), True)
        array = (low.llama_token * len(ids))(*ids)
        status = low.llama_decode(self.context, low.llama_batch_get_one(array, len(ids)))
        if status != 0:
            raise WiolaError(f"llama_decode failed ({status})")
        row = low.llama_get_logits_ith(self.context, -1)
        return [row[i] for i in range(self.n_vocab)]

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """`new_tokens` greedy tokens after the prompt `ids` (argmax of llama.cpp's logits; no stop token)."""
        out, logits = [], self.logits(ids)
        for step in range(new_tokens):
            token = max(range(self.n_vocab), key=logits.__getitem__)
            out.append(token)
            if step + 1 < new_tokens:
                logits = self.logits([token], fresh=False)
        return out

    def follow(self, ids: list[int], tokens: list[int]) -> list[list[float]]:
        """llama.cpp's logits before each of `tokens` when the prompt `ids` is continued by them (teacher forcing)."""
        rows = [self.logits(ids)]
        for token in tokens[:-1]:
            rows.append(self.logits([token], fresh=False))
        return rows

    def close(self) -> None:
        if getattr(self, "context", None):
            self.low.llama_free(self.context)
            self.low.llama_model_free(self.model)
            self.context = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def llama_bench(gguf_path: str | Path, new_tokens: int, prompt_tokens: int = 0, threads: int = 1, repetitions: int = 1,
                timeout: float = 600) -> list[dict]:
    """Run `llama-bench -m GGUF -p 0 -n N [-pg P,N] -t T -r R -o json` and return its records (one per test:
    `n_prompt`, `n_gen`, `avg_ts` tokens/s, `stddev_ts`, ...)."""
    command = [str(binary("llama-bench")), "-m", str(gguf_path), "-p", "0", "-n", str(new_tokens),
               *(["-pg", f"{prompt_tokens},{new_tokens}"] if prompt_tokens else []),
               "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise WiolaError(f"llama-bench failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)
