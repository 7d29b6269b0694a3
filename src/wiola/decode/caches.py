"""What `wiola.decode` keeps on disk and how it names it, and the CPU settings: the thread count, the inductor settings
of a compiled CPU decode step, torch's compile caches, and the identity of a model's config.

**Threads.** Decoding a small model is a chain of small matrix-vector products; threads beyond the
physical cores (SMT siblings) only add synchronisation. `wiola.cpu.cpu_threads()` (shared with training)
sets torch's intra-op threads to the physical cores this process may run on, unless the user chose
(`OMP_NUM_THREADS`/`MKL_NUM_THREADS`).

**Compiled CPU step** (opt-in: `compile=True`, `--compile on`). Inductor with `freezing` (parameters become
constants, so the linear layers run MKL's prepacked GEMM — most of the gain on CPU) and `cpp_wrapper` (the
step is one C++ call, not a Python function launching kernels — the rest). Freezing bakes the weights in: a
decoder built on a model must be rebuilt after the model's weights change.

**Caches.** Inductor's own caches (FX graph cache, AOT autograd cache, compiled C++ kernels) live under
`TORCHINDUCTOR_CACHE_DIR` (default `/tmp/torchinductor_$USER`). After every CPU compile, `StaticDecoder`
also saves torch's portable cache artifacts (`torch.compiler.save_cache_artifacts`) per `signature` in
`compile_cache_dir()` — `$WIOLA_COMPILE_CACHE`, else `compile/` in the wiola cache (`$WIOLA_CACHE`,
`$XDG_CACHE_HOME/wiola` or `~/.cache/wiola`) — and loads them before compiling the same signature again, so a
warm compile survives a cleared `/tmp`. Writing there is best effort (a read-only home only loses the speed-up).

**Identity.** Signatures and the ONNX cache key see the config's content without the fields that say where it
was loaded from (`config_content`), so `runs/x`, `/abs/runs/x` and a copy of the same weights elsewhere share
their compile artifacts and their export. `remove_leftovers` removes what killed writers left in a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

CPU_INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True}
PROVENANCE_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")  # where a config came from, not what it is
LEFTOVER_S = 24 * 3600  # a temporary file or folder this old is a dead writer's, whatever its PID says
DEAD_WRITER_S = 600  # ... and one whose writer's PID is gone, once this old (a writer in another PID namespace may look dead)


def compile_cache_dir() -> Path:
    """Where torch's saved compile artifacts live (see the module docstring)."""
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


_LEFTOVER = re.compile(r"^(?:records\.(\d+)\.tmp|\.[0-9a-f]{8,}-(?:(\d+)-)?.+)$")  # a (former) ledger's temporary file, an export's temporary folder


def remove_leftovers(root: Path) -> list[str]:
    """Remove what killed writers left in a cache folder: `records.PID.tmp` (the timing ledgers of earlier versions) and `.KEY-PID-xxxx`
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
