"""CPU decoding choices for `StaticDecoder` and `wiola generate`: the thread count, the inductor settings
of a compiled CPU decode step, and when compiling pays back.

**Threads.** Decoding a small model is a chain of small matrix-vector products; threads beyond the
physical cores (SMT siblings) only add synchronisation. `wiola.cpu.cpu_threads()` (shared with training)
sets torch's intra-op threads to the physical cores this process may run on, unless the user chose
(`OMP_NUM_THREADS`/`MKL_NUM_THREADS`).

**Compiled CPU step.** Inductor with `freezing` (parameters become constants, so the linear layers run
MKL's prepacked GEMM — most of the gain on CPU) and `cpp_wrapper` (the step is one C++ call, not a
Python function launching kernels — the rest). Freezing bakes the weights in: a decoder built on a model
must be rebuilt after the model's weights change.

**Payback.** Compiling costs tens of seconds on a laptop-class CPU the first time and several seconds
afterwards (torch's caches, see below); it saves a fixed share of every step. `StaticDecoder` with
`compile="auto"` runs the first `PROBE_STEPS` steps eagerly, times them, and compiles the step for the
rest of the run only when the remaining steps × the expected saving per step exceed the expected compile
time. Both expectations come from the ledger (`records.json`) of earlier compiles of the same model shape,
batch and cache size on this machine, or — never compiled here — from `COLD_COMPILE_S` and
`DEFAULT_SPEEDUP`, measured on the project's 2-core development machine (docs/benchmarks.md).

**Caches.** Inductor's own caches (FX graph cache, AOT autograd cache, compiled C++ kernels) live under
`TORCHINDUCTOR_CACHE_DIR` (default `/tmp/torchinductor_$USER`). After every CPU compile, `StaticDecoder`
also saves torch's portable cache artifacts (`torch.compiler.save_cache_artifacts`) next to the ledger in
`compile_cache_dir()` — `$WIOLA_COMPILE_CACHE`, else `compile/` in the wiola cache (`$WIOLA_CACHE`,
`$XDG_CACHE_HOME/wiola` or `~/.cache/wiola`) — and loads them before compiling the same signature again, so a warm compile
survives a cleared `/tmp`. Writing there is best effort (a read-only home only loses the speed-up).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

PROBE_STEPS = 8  # eager steps timed before deciding to compile
COLD_COMPILE_S = 40.0  # first compile of a nano-sized step, 2 busy cores (measured 29–60 s)
DEFAULT_SPEEDUP = 2.0  # eager ms/step ÷ compiled ms/step before anything is recorded (measured 2.0–2.5× on nano shapes)
CPU_INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True}


def compile_cache_dir() -> Path:
    """Where the compile ledger and torch's cache artifacts live (see the module docstring)."""
    root = os.environ.get("WIOLA_COMPILE_CACHE")
    if root:
        return Path(root).expanduser()
    from wiola.data.shakespeare import cache_root

    return cache_root() / "compile"


def signature(model, batch: int, capacity: int, quantize: str | None, threads: int) -> str:
    """What a compiled step depends on: torch, the model's config and dtype, batch, cache size, quantization, threads."""
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    parts = [torch.__version__, json.dumps(config, sort_keys=True, default=str), str(next(model.parameters()).dtype),
             batch, capacity, quantize, threads, torch.backends.cpu.get_cpu_capability()]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class Ledger:
    """`records.json` in the compile cache: per signature, the compile seconds and eager/compiled ms per step."""

    def __init__(self, root: Path | None = None):
        self.path = (root or compile_cache_dir()) / "records.json"

    def read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, sig: str) -> dict:
        return self.read().get(sig, {})

    def update(self, sig: str, **fields: float) -> None:
        records = self.read()
        records.setdefault(sig, {}).update({k: round(float(v), 4) for k, v in fields.items()})
        self.write(records)

    def write(self, records: dict[str, dict]) -> None:
        """Replace the ledger atomically (best effort: an unwritable cache only loses the records)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError:
            pass


def compile_pays_back(record: dict, eager_ms: float, remaining_steps: int) -> bool:
    """Whether `remaining_steps` compiled steps save more than compiling costs (see the module docstring)."""
    compile_s = record.get("compile_s", COLD_COMPILE_S)
    if record.get("eager_ms") and record.get("compiled_ms"):
        speedup = max(record["eager_ms"] / record["compiled_ms"], 1.0)
    else:
        speedup = DEFAULT_SPEEDUP
    saving_s = eager_ms * (1.0 - 1.0 / speedup) / 1000.0
    return remaining_steps * saving_s > compile_s


def load_artifacts(sig: str) -> bool:
    """Pre-populate torch's compile caches from the artifacts saved for `sig` (True when there were some)."""
    path = compile_cache_dir() / f"{sig}.bin"
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    if load is None or not path.is_file():
        return False
    try:
        load(path.read_bytes())
        return True
    except Exception:  # a stale or foreign artifact file only costs the speed-up
        return False


def save_artifacts(sig: str) -> None:
    save = getattr(torch.compiler, "save_cache_artifacts", None)
    if save is None:
        return
    try:
        result = save()
        if result is None:
            return
        data = result[0]
        root = compile_cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{sig}.bin").write_bytes(data)
    except Exception:
        pass
