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

**Ledger and identity.** A ledger that is not an object of records (each an object of numbers) is treated as
empty, with a one-line note on stderr (once per process), and is rewritten by the next update; the
`records.PID.tmp` files of writers that died are removed (`remove_leftovers`). Signatures and the ONNX cache
key see the config's content without the fields that say where it was loaded from (`config_content`), so
`runs/x`, `/abs/runs/x` and a copy of the same weights elsewhere share their records and their export.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

PROBE_STEPS = 8  # eager steps timed before deciding to compile
COLD_COMPILE_S = 40.0  # first compile of a nano-sized step, 2 busy cores (measured 29–60 s)
DEFAULT_SPEEDUP = 2.0  # eager ms/step ÷ compiled ms/step before anything is recorded (measured 2.0–2.5× on nano shapes)
CPU_INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True}
PROVENANCE_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")  # where a config came from, not what it is
LEFTOVER_S = 24 * 3600  # a temporary file or folder this old is a dead writer's, whatever its PID says
DEAD_WRITER_S = 600  # ... and one whose writer's PID is gone, once this old (a writer in another PID namespace may look dead)


def compile_cache_dir() -> Path:
    """Where the compile ledger and torch's cache artifacts live (see the module docstring)."""
    root = os.environ.get("WIOLA_COMPILE_CACHE")
    if root:
        return Path(root).expanduser()
    from wiola.data.shakespeare import cache_root

    return cache_root() / "compile"


def config_content(config) -> dict:
    """The config's fields without those that record where it was loaded from (`PROVENANCE_KEYS`): the same
    model loaded by a relative path, an absolute one or from a copy has one content."""
    return {k: v for k, v in config.to_dict().items() if k not in PROVENANCE_KEYS}


def signature(model, batch: int, capacity: int, quantize: str | None, threads: int) -> str:
    """What a compiled step depends on: torch, the model's config (`config_content`) and dtype, batch, cache size, quantization, threads."""
    config = config_content(model.config)
    parts = [torch.__version__, json.dumps(config, sort_keys=True, default=str), str(next(model.parameters()).dtype),
             batch, capacity, quantize, threads, torch.backends.cpu.get_cpu_capability()]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


_NOTED: set[Path] = set()  # malformed ledgers already reported by this process


def _malformed(records) -> str | None:
    """What is wrong with a ledger's parsed content (None: an object of records, each an object of finite numbers)."""
    if not isinstance(records, dict):
        return f"a JSON {type(records).__name__}, not an object of records"
    for key, record in records.items():
        if not isinstance(record, dict):
            return f"record {key!r} is not an object"
        for field, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{key}.{field} is not a number"
    return None


class Ledger:
    """`records.json` in the compile cache: per signature, the compile seconds and eager/compiled ms per step.

    A ledger that cannot be parsed, or whose content is not records of numbers, reads as empty (with a note
    on stderr, once per process); the next update replaces it."""

    def __init__(self, root: Path | None = None):
        self.path = (root or compile_cache_dir()) / "records.json"

    def read(self) -> dict[str, dict]:
        try:
            text = self.path.read_text()
        except OSError:  # none yet (or unreadable): nothing recorded
            return {}
        try:
            records = json.loads(text)
            problem = _malformed(records)
        except ValueError:
            problem = "not JSON"
        except RecursionError:
            problem = "nested too deeply"
        if problem is None:
            return records
        if self.path not in _NOTED:
            _NOTED.add(self.path)
            print(f"wiola: note: ignoring the malformed ledger {self.path} ({problem}); its timings start over", file=sys.stderr, flush=True)
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
        remove_leftovers(self.path.parent)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (True when that cannot be told: on Windows, or another user's)."""
    if os.name == "nt" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_LEFTOVER = re.compile(r"^(?:records\.(\d+)\.tmp|\.[0-9a-f]{8,}-(?:(\d+)-)?.+)$")  # a ledger's temporary file, an export's temporary folder


def remove_leftovers(root: Path) -> list[str]:
    """Remove what killed writers left in a cache folder: `records.PID.tmp` (`Ledger.write`) and `.KEY-PID-xxxx`
    (`OnnxEngine.export`) whose process is gone and that are `DEAD_WRITER_S` old, or any such `LEFTOVER_S` old.
    Best effort; returns the names removed."""
    removed = []
    now = time.time()
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _LEFTOVER.match(path.name)
        if match is None:
            continue
        pid = match.group(1) or match.group(2)
        try:
            age = now - path.lstat().st_mtime
        except OSError:
            continue
        if age < LEFTOVER_S and (pid is None or age < DEAD_WRITER_S or pid_alive(int(pid))):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    return removed


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
