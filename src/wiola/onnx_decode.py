"""The ONNX engine of `StaticDecoder` on CPU: the model's own `wiola export --to onnx` step graph
(`wiola.export.to_onnx`), run by onnxruntime, exported once per set of weights and cached across runs.

**Cache.** `onnx_cache_dir()` — `$WIOLA_ONNX_CACHE`, else `<wiola cache>/onnx` with the wiola cache at
`$WIOLA_CACHE`, `$XDG_CACHE_HOME/wiola` or `~/.cache/wiola` — holds one export folder per `model_key(model)`
(a hash of the weights, the config's content — `cpu_decode.config_content`, not the path it was loaded from —
and dtype, and the exporter: torch's and onnxscript's versions and the graph format), written atomically, and a
ledger `records.json` (`cpu_decode.Ledger`): per model key the export seconds (or that the export failed) and
the decoding time forgone on torch; per decode signature (`cpu_decode.signature`: the model's shape, batch,
cache size, threads) the eager and onnxruntime ms per step. The cache keeps the `KEEP_EXPORTS` most recently
used exports; deleting it at any time only costs re-exports.

**Quantized weights.** `OnnxEngine(model, quantize="int8"|"int4")` runs the float32 export with block-wise
weights (`wiola.export.onnx_quant`: onnxruntime's MatMulNBits, the Q8_0 / Q4_0 class), cached beside it in
`<key>-int8` / `<key>-int4`, quantized from the float32 folder (which is exported first when missing).

**Verified before use.** Each export folder holds `RECORD` (`wiola_cache.json`): the key it was exported for,
its quantization (null: float32) and the sha256 of each of its files. A folder is used only when its record
names this model's key and the quantization asked for, every file still has its hash and the graph's metadata
names the same quantization (`mismatch`, checked once per engine); otherwise (another model's export copied
under this key, an int8 folder under the float32 name, an edited initializer, a file missing) the folder is
removed and the model exported again, with a one-line note — never another model's text.

**Per-step overhead.** `OnnxRun` keeps the state in two preallocated sets of buffers and binds them with
onnxruntime's IO binding, the step reading one set and writing the other (ping-pong: the graph's outputs never
alias its inputs), with the token, mask and logits in bound buffers too: a step allocates nothing and copies
no state outside the graph.

**When (`engine="auto"`, `StaticDecoder`).** The export pays once, each later run only loads the session
(tens of ms at nano size). With a cached export, the run decodes on onnxruntime from the prompt on when the
ledger says onnxruntime's step is faster than eager's for this signature, and stays on torch when it says it
is slower; with only one of the two times known, the first `cpu_decode.PROBE_STEPS` steps run eagerly (timed)
and the rest on onnxruntime (timed), so the next run knows both. Without a cached export the run probes the
same way, then exports when the decoding time this model has lost on torch — this run's expected loss
included — reaches the expected export time (rent or buy: runs of a model used once pay nothing, a model
used often pays the export once, and at worst twice its cost is spent in all). Expected values come from the
ledger, else from `COLD_EXPORT_S` and `DEFAULT_SPEEDUP` (measured on the 2-core development machine).

`OnnxEngine` is the per-model handle (key, cache folder, export, session); `OnnxRun` one generate call's state.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import cpu_decode

COLD_EXPORT_S = 15.0  # export + onnxruntime check, tiny and llama-nano shapes, 1 busy core: 11–13 s
DEFAULT_SPEEDUP = {1: 2.0}  # eager ms ÷ onnxruntime ms before anything is recorded, by batch (batch 1: 2.0–3.1× measured);
DEFAULT_SPEEDUP_BATCHED = 1.0  # larger batches: 0.8–1.3× measured, so no export is paid for on a guess
KEEP_EXPORTS = 8  # exports kept in the cache (the most recently used); the ledger keeps the losses of this many models
KEEP_LOSSES = 256
IO_BINDING = True  # `OnnxRun` binds preallocated buffers (False: plain `session.run`, a new state each step)


def missing(export: bool) -> list[str]:
    """The packages the engine needs that are not installed: onnxruntime to run, onnx and onnxscript to export."""
    names = ("onnxruntime", "onnx", "onnxscript") if export else ("onnxruntime",)
    return [name for name in names if importlib.util.find_spec(name) is None]


def first_time(hint: str) -> bool:
    """True the first time `hint` is asked about on this machine (a marker in the ONNX cache); True again
    if the marker cannot be written, so a hint is never lost to a read-only cache."""
    marker = onnx_cache_dir() / "shown" / hint
    if marker.exists():
        return False
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass
    return True


def onnx_cache_dir() -> Path:
    root = os.environ.get("WIOLA_ONNX_CACHE")
    if root:
        return Path(root).expanduser()
    from wiola.data.shakespeare import cache_root

    return cache_root() / "onnx"


def _exporter() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from wiola.export.to_onnx import FORMAT

    try:
        onnxscript = version("onnxscript")
    except PackageNotFoundError:
        onnxscript = None
    return f"{FORMAT} torch {torch.__version__} onnxscript {onnxscript}"


def model_key(model) -> str:
    """What an export depends on: every weight's bytes, the config's content (not where it was loaded from),
    the dtype and the exporter."""
    config = cpu_decode.config_content(model.config)
    h = hashlib.sha256(json.dumps([_exporter(), config], sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name} {t.dtype} {tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()[:24]


RECORD = "wiola_cache.json"  # in each export folder: the key it was exported for and its files' sha256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def seal(folder: Path, key: str, quantize: str | None = None) -> None:
    """Write `RECORD` into an export folder: `key`, its quantization and the sha256 of every other file in it."""
    hashes = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD}
    record = {"key": key, "quantize": quantize, "sha256": hashes}
    (folder / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _kind(quantize: str | None) -> str:
    return quantize or "float32"


def mismatch(folder: Path, key: str, quantize: str | None = None) -> str | None:
    """Why `folder` does not hold the export of the model keyed `key` with `quantize` weights, as it was written
    (None: it does)."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        return f"it has no {RECORD}"
    except (OSError, ValueError) as exc:
        return f"cannot read {RECORD}: {type(exc).__name__}"
    hashes = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(hashes, dict) or "wiola_onnx.json" not in hashes or not all(
            isinstance(n, str) and isinstance(d, str) and n == Path(n).name and n not in ("", ".", "..") for n, d in hashes.items()):
        return f"{RECORD} is malformed"
    if record.get("key") != key:
        return f"it holds the export of other weights (key {str(record.get('key'))[:24]})"
    if record.get("quantize") != quantize:
        return f"it holds the {_kind(record.get('quantize'))} export, not the {_kind(quantize)} one"
    for name, digest in hashes.items():
        try:
            if _sha256(folder / name) != digest:
                return f"{name} changed after the export"
        except OSError:
            return f"{name} is missing"
    try:
        meta = json.loads((folder / "wiola_onnx.json").read_text())
        graph, kind = meta.get("graph"), meta.get("quantize")
    except (OSError, ValueError, AttributeError):
        graph = kind = None
    if graph not in hashes:
        return f"its graph {graph!r} is not among the exported files"
    if kind != quantize:
        return f"its graph is the {_kind(kind)} export, not the {_kind(quantize)} one"
    return None


def ledger() -> cpu_decode.Ledger:
    return cpu_decode.Ledger(onnx_cache_dir())


def expected_export_s(records: dict) -> float:
    """The mean export time recorded on this machine (exports of any model take about as long), else the default."""
    times = [r["export_s"] for r in records.values() if "export_s" in r]
    return sum(times) / len(times) if times else COLD_EXPORT_S


def expected_speedup(record: dict, batch: int) -> float:
    if record.get("eager_ms") and record.get("onnx_ms"):
        return record["eager_ms"] / record["onnx_ms"]
    return DEFAULT_SPEEDUP.get(batch, DEFAULT_SPEEDUP_BATCHED)


def saving_ms(record: dict, batch: int, eager_ms: float) -> float:
    """Expected ms saved per step by onnxruntime (negative: it is slower)."""
    return eager_ms * (1.0 - 1.0 / expected_speedup(record, batch))


def add_forgone(key: str, seconds: float) -> None:
    """Add a run's expected loss on torch to the model's tally (the ledger keeps the `KEEP_LOSSES` largest tallies
    of models not exported: every checkpoint decoded once, as during training, adds one)."""
    book = ledger()
    records = book.read()
    total = records.get(key, {}).get("forgone_s", 0.0) + seconds
    tallies = sorted((r["forgone_s"], k) for k, r in records.items() if "forgone_s" in r and "export_s" not in r and k != key)
    for _, k in tallies[: max(0, len(tallies) + 1 - KEEP_LOSSES)]:
        records[k].pop("forgone_s")
        if not records[k]:
            del records[k]
    records.setdefault(key, {})["forgone_s"] = round(total, 4)
    book.write(records)


def export_pays_back(forgone_s: float, export_s: float, saving_per_step_ms: float, steps: int) -> bool:
    """Rent or buy: export once the time lost on torch (`forgone_s` earlier, `steps` × saving in this run) reaches the export's cost."""
    return saving_per_step_ms > 0 and forgone_s + steps * saving_per_step_ms / 1000.0 >= export_s


class OnnxRun:
    """One generate call on onnxruntime: `prefill(ids, mask)` (a chunk, once), then a call per token `[B, 1]`, each
    returning the last position's logits `[B, V]` as a torch tensor (`pick_next` samples from them as from torch's).

    With `bind` (default `IO_BINDING`) the state lives in two preallocated sets of buffers bound with onnxruntime's
    IO binding: each step reads one set and writes the other (ping-pong), the token and mask are bound buffers
    filled in place and the logits land in one of two bound buffers (valid until the next step but one)."""

    def __init__(self, session, batch: int, capacity: int, bind: bool | None = None):
        self.session = session
        self.bind = IO_BINDING if bind is None else bind
        self.state = session.empty_state(batch, capacity)
        if self.bind:
            self._bind(batch, capacity)

    def _bind(self, batch: int, capacity: int) -> None:
        from onnxruntime import OrtValue

        session, run = self.session, self.session.session
        sets = [self.state, session.empty_state(batch, capacity)]
        self.token = np.zeros((batch, 1), dtype=np.int64)
        ones = np.ones((batch, 1), dtype=np.int64)
        self.logits = [np.empty((batch, 1, session.meta["vocab_size"]), dtype=np.float32) for _ in range(2)]
        # OrtValues over the numpy buffers (no copy on CPU); kept here so that the memory outlives the bindings
        self._values = [[OrtValue.ortvalue_from_numpy(a) for a in state] for state in sets]
        self._io = [OrtValue.ortvalue_from_numpy(self.token), OrtValue.ortvalue_from_numpy(ones)]
        self._out = [OrtValue.ortvalue_from_numpy(a) for a in self.logits]
        self.bindings = []
        for src in (0, 1):  # binding `src` reads state set src, writes set 1 - src and logits buffer 1 - src
            binding = run.io_binding()
            binding.bind_ortvalue_input("input_ids", self._io[0])
            binding.bind_ortvalue_input("attention_mask", self._io[1])
            for name, value in zip(session.inputs, self._values[src]):
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output("logits", self._out[1 - src])
            for name, value in zip(session.outputs[1:], self._values[1 - src]):
                binding.bind_ortvalue_output(name, value)
            self.bindings.append(binding)
        self.current = 0  # the set holding the state

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids.contiguous().numpy(), mask.contiguous().numpy()
        if not self.bind:
            logits, self.state = self.session(ids, mask, self.state)
            return torch.from_numpy(logits[:, -1])
        run = self.session.session
        binding = run.io_binding()  # a chunk of any length: its logits in a buffer onnxruntime allocates
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        for name, value in zip(self.session.inputs, self._values[self.current]):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.session.outputs[1:], self._values[1 - self.current]):
            binding.bind_ortvalue_output(name, value)
        run.run_with_iobinding(binding)
        self.current = 1 - self.current
        return torch.from_numpy(binding.get_outputs()[0].numpy()[:, -1])

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if not self.bind:
            logits, self.state = self.session(token.numpy(), torch.ones_like(token).numpy(), self.state)
            return torch.from_numpy(logits[:, -1])
        self.token[:] = token.numpy()
        self.session.session.run_with_iobinding(self.bindings[self.current])
        self.current = 1 - self.current
        return torch.from_numpy(self.logits[self.current][:, -1])


class OnnxEngine:
    """The ONNX engine for one model: its cache key and folder, the export, the onnxruntime session. `quantize`
    ("int8", "int4" or None) picks the weights: the quantized folder `<key>-<quantize>` beside the float32 `<key>`.

    The key hashes the weights when first needed: rebuild the engine (the decoder) after changing them."""

    def __init__(self, model, quantize: str | None = None):
        self.model = model
        self.quantize = quantize
        self._key: str | None = None
        self._session = None
        self._verified = False  # the folder passed `mismatch` (or this engine wrote it)
        self.stale: str | None = None  # why the cached folder was not this model's export (it was removed)
        self.export_s: float | None = None  # seconds the export took in this process

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = model_key(self.model)
        return self._key

    @property
    def name(self) -> str:
        """The cache folder's name and the ledger's key for this export: the model key, and the quantization."""
        return self.key if self.quantize is None else f"{self.key}-{self.quantize}"

    @property
    def folder(self) -> Path:
        return onnx_cache_dir() / self.name

    def cached(self) -> bool:
        """Whether the cache holds this model's export as it was written (`mismatch`, checked once per engine).
        A folder that fails the check is removed, and why is kept in `stale` for the caller to say."""
        if self._verified:
            return True
        if not self.folder.exists():
            return False
        reason = mismatch(self.folder, self.key, self.quantize)
        if reason is None:
            self._verified = True
            return True
        self.stale = reason
        shutil.rmtree(self.folder, ignore_errors=True)
        return False

    def export(self) -> float:
        """Export into the cache (atomically; a concurrent export of the same key wins harmlessly); returns the
        seconds taken and records them. Raises on failure, recording it. A quantized engine quantizes the cached
        float32 export, exporting that first when it is not cached."""
        from wiola.export.to_onnx import export_onnx

        root = onnx_cache_dir()
        start = time.perf_counter()
        try:
            root.mkdir(parents=True, exist_ok=True)
            plain = None
            if self.quantize is not None:
                plain = OnnxEngine(self.model)
                plain._key = self.key
                if not plain.cached():
                    plain.export()
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}-{os.getpid()}-", dir=root))  # the PID: `cpu_decode.remove_leftovers`
            try:
                if plain is None:
                    export_onnx(self.model, tmp / "no-tokenizer", tmp)
                else:
                    from wiola.export.onnx_quant import quantize_folder

                    quantize_folder(plain.folder, tmp, self.quantize)
                seal(tmp, self.key, self.quantize)
                try:
                    os.replace(tmp, self.folder)
                    self._verified = True
                except OSError:  # another process exported the same key first
                    if not self.cached():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception:
            ledger().update(self.name, export_failed=1)
            raise
        self.export_s = time.perf_counter() - start
        ledger().update(self.name, export_s=self.export_s)
        self._prune(root)
        return self.export_s

    def _prune(self, root: Path) -> None:
        """Keep the `KEEP_EXPORTS` most recently used exports (`start` marks a use); remove killed exports' leftovers."""
        exports = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "shown"),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in exports[KEEP_EXPORTS:]:
            shutil.rmtree(old, ignore_errors=True)
        cpu_decode.remove_leftovers(root)

    def failed_before(self) -> bool:
        return bool(ledger().get(self.name).get("export_failed"))

    def start(self, batch: int, capacity: int) -> OnnxRun:
        if self._session is None:
            from wiola.export.onnx_run import OnnxStepSession

            try:
                os.utime(self.folder)  # used: the last to be pruned
            except OSError:
                pass

            self._session = OnnxStepSession(self.folder, threads=torch.get_num_threads())
        return OnnxRun(self._session, batch, capacity)
