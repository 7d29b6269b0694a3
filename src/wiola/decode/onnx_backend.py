"""The onnxruntime backend of `wiola.decode` (CPU): the model's own `wiola export --to onnx` step graph
(`wiola.export.to_onnx`), run by onnxruntime, exported once per set of weights and cached across runs. Its run
(`OnnxRun`) has the step interface of `loop.decode_loop`.

**Cache.** `onnx_cache_dir()` — `$WIOLA_ONNX_CACHE`, else `<wiola cache>/onnx` with the wiola cache at
`$WIOLA_CACHE`, `$XDG_CACHE_HOME/wiola` or `~/.cache/wiola` — holds one export folder per `model_key(model)`
(a hash of the weights, the config's content — `caches.config_content`, not the path it was loaded from —
and dtype, and the exporter: torch's and onnxscript's versions and the graph format), written atomically. It is
filled by `OnnxEngine.export` (at the end of `wiola train` on CPU, `wiola.train.engine_cache`, and by the first
`engine="onnx"` or `quantize` run) and by `wiola export --to onnx`
(`OnnxEngine.adopt`: the folder just written, copied in). The cache keeps the `KEEP_EXPORTS` most recently used
exports; deleting it at any time only costs re-exports.

**Quantized weights.** `OnnxEngine(model, quantize="int8"|"int4")` runs the float32 export with block-wise
weights (`wiola.export.onnx_quant`: onnxruntime's MatMulNBits, the Q8_0 / Q4_0 class), cached beside it in
`<key>-int8` / `<key>-int4`, quantized from the float32 folder (which is exported first when missing).

**Verified before use.** Each export folder holds `RECORD` (`wiola_cache.json`): the key it was exported for,
its quantization (null: float32), the sha256 of each of its files and each file's identity when it was hashed
(size, modification and change times in ns, inode, device). A folder is used only when its record names this
model's key and the quantization asked for, every file still has its hash and the graph's metadata names the
same quantization (`mismatch`, checked once per engine); otherwise (another model's export copied under this
key, an int8 folder under the float32 name, an edited initializer, a file missing) the folder is removed and
the model exported again, with a one-line note — never another model's text. A file whose identity is the one
recorded is not hashed again: any write to it, or a copy or rename over it, changes its change time (which no
program can set back) or its inode, and a 492 MB graph then costs a `stat` instead of 0.35 s of sha256.

**Per-step overhead.** `OnnxRun` keeps the state in two preallocated sets of buffers and binds them with
onnxruntime's IO binding, the step reading one set and writing the other (ping-pong), with the token, mask and
logits in bound buffers too: a step allocates nothing and copies no state outside the graph. Every layer's
keys/values are one buffer in both sets during decode steps: the graph reads a plain layer's only in the
ScatterElements writing the new slot, an ATM layer's one-token step also in the Gather of the last group that
the ScatterElements waits for (`in_place_state`, recorded by the export), so onnxruntime writes the slot in place
instead of copying the whole cache into the other set every step (a cost that grows with the capacity). An ATM
layer's prompt chunk rewrites its compacted groups, so the prefill reads its keys/values from one buffer and
writes them to the other, which the decode steps then update in place (`OnnxRun.home`).

**When** (`choose`). `engine="auto"` (`StaticDecoder`) runs onnxruntime when this model's export is in the cache and
onnxruntime is installed, else torch eager: it never exports, and nothing is timed. The export is made at a known
moment: at the end of `wiola train` on CPU, by `wiola export --to onnx [--quantize ...]`, or by the first run that
asks for the engine (`engine="onnx"`, or `quantize`). A cached export costs a run only the session's load (tens of ms at nano size)
and the hash of the weights that finds it.

`OnnxEngine` is the per-model handle (key, cache folder, export, adoption, session); `OnnxRun` one generate call's state.
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

from . import caches

COLD_EXPORT_S = 15.0  # export + onnxruntime check at nano shapes, 1 busy core: 11–16 s (the note's estimate)
KEEP_EXPORTS = 8  # exports kept in the cache (the most recently used)
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

    from wiola.export.to_onnx import graph_format

    try:
        onnxscript = version("onnxscript")
    except PackageNotFoundError:
        onnxscript = None
    return f"{graph_format()} torch {torch.__version__} onnxscript {onnxscript}"


def model_key(model) -> str:
    """What an export depends on: every weight's bytes, the config's content (not where it was loaded from),
    the dtype and the exporter."""
    config = caches.config_content(model.config)
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


def _identity(path: Path) -> list[int]:
    """What changes when a file is written, replaced or copied over: size, modification and change times (ns; the
    change time cannot be set back by any program), inode and device."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def seal(folder: Path, key: str, quantize: str | None = None) -> None:
    """Write `RECORD` into an export folder: `key`, its quantization, the sha256 of every other file in it and the
    file's identity (`_identity`) when hashed."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD]
    hashes = {p.name: _sha256(p) for p in files}
    _write_record(folder, {"key": key, "quantize": quantize, "sha256": hashes, "identity": {p.name: _identity(p) for p in files}})


def _write_record(folder: Path, record: dict) -> None:
    """Write `RECORD` atomically (a reader sees the old record or the new one)."""
    tmp = folder / f".{RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / RECORD)


def _kind(quantize: str | None) -> str:
    return quantize or "float32"


def mismatch(folder: Path, key: str, quantize: str | None = None) -> str | None:
    """Why `folder` does not hold the export of the model keyed `key` with `quantize` weights, as it was written
    (None: it does). Files whose identity is not the recorded one are hashed; when the folder passes, their
    identities are recorded, so that the next check only reads them."""
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
    identities = record.get("identity") if isinstance(record.get("identity"), dict) else {}
    fresh = {}  # files hashed now that did not change while hashed: their identities, for the next check
    for name, digest in hashes.items():
        try:
            before = _identity(folder / name)
            if identities.get(name) == before:
                continue  # not written, replaced or copied over since it was hashed: the same bytes
            if _sha256(folder / name) != digest:
                return f"{name} changed after the export"
            if _identity(folder / name) == before:
                fresh[name] = before
        except OSError:
            return f"{name} is missing"
    try:
        meta = json.loads((folder / "wiola_onnx.json").read_text())
        graph, kind, blocks = meta.get("graph"), meta.get("quantize"), (meta.get("quantization") or {}).get("block_size")
    except (OSError, ValueError, AttributeError):
        graph = kind = blocks = None
    if graph not in hashes:
        return f"its graph {graph!r} is not among the exported files"
    if kind != quantize:
        return f"its graph is the {_kind(kind)} export, not the {_kind(quantize)} one"
    if quantize:
        from wiola.export.onnx_quant import BLOCK_SIZE

        if blocks != BLOCK_SIZE:
            return f"its {quantize} weights are in blocks of {blocks}, not {BLOCK_SIZE}"
    if fresh:  # (a record written before identities were kept, or a file touched since: hashed once, not again)
        try:
            _write_record(folder, {**record, "identity": {**identities, **fresh}})
        except OSError:  # a read-only cache: checked by hash every time, as before
            pass
    return None


def _holds_exports(root: Path) -> bool:
    try:
        return any(p.is_dir() and not p.name.startswith(".") and p.name != "shown" for p in root.iterdir())
    except OSError:
        return False


def in_place_state(session, prefill: bool = True) -> frozenset[str]:
    """The keys/values state tensors a step of `session` (an `OnnxStepSession`) may update in place
    (`wiola.export.onnx_branch.in_place_names`): as the export recorded them in its metadata, else read from its
    graph (empty when it cannot be read: no `onnx`). `prefill`: prompt chunks run on the same buffers as the decode
    steps."""
    recorded = session.meta.get("in_place")
    if recorded is not None:
        return frozenset(recorded["prefill" if prefill else "decode"])
    try:
        import onnx

        from wiola.export.onnx_branch import in_place_names

        model = onnx.load(str(session.folder / session.meta["graph"]), load_external_data=False)
    except Exception:
        return frozenset()
    return in_place_names(model, session.meta, prefill)


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

        session = self.session
        # keys/values the graph updates in place are one buffer in both sets: no step copies them. Plain layers' in
        # every step (`shared`); ATM layers' in decode steps only (`late`: a prompt chunk reads one buffer and writes
        # the other, whose buffer the decode steps then update in place, `home`)
        shared, decode = in_place_state(session), in_place_state(session, prefill=False)
        names = [s["name"] for s in session.meta["state"]]
        self.late = [i for i, name in enumerate(names) if name in decode and name not in shared]
        sets = [self.state, [mine if name in shared else other for name, mine, other in zip(names, self.state, session.empty_state(batch, capacity))]]
        self.token = np.zeros((batch, 1), dtype=np.int64)
        ones = np.ones((batch, 1), dtype=np.int64)
        self.logits = [np.empty((batch, 1, session.meta["vocab_size"]), dtype=np.float32) for _ in range(2)]
        # OrtValues over the numpy buffers (no copy on CPU); kept here so that the memory outlives the bindings
        self._values = [[OrtValue.ortvalue_from_numpy(a) for a in state] for state in sets]
        self._io = [OrtValue.ortvalue_from_numpy(self.token), OrtValue.ortvalue_from_numpy(ones)]
        self._out = [OrtValue.ortvalue_from_numpy(a) for a in self.logits]
        self.home = 0  # the set whose buffers hold the `late` tensors during decode steps
        self._decode_bindings: dict[int, list] = {}
        self.current = 0  # the set holding the state

    @property
    def bindings(self) -> list:
        """The two decode-step bindings: binding `src` reads state set src, writes set 1 - src and logits buffer
        1 - src; the `late` tensors read and write the `home` set's buffers in both."""
        if self.home not in self._decode_bindings:
            run = self.session.session
            sets = [list(values) for values in self._values]
            for i in self.late:
                sets[0][i] = sets[1][i] = self._values[self.home][i]
            pair = []
            for src in (0, 1):
                binding = run.io_binding()
                binding.bind_ortvalue_input("input_ids", self._io[0])
                binding.bind_ortvalue_input("attention_mask", self._io[1])
                for name, value in zip(self.session.inputs, sets[src]):
                    binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output("logits", self._out[1 - src])
                for name, value in zip(self.session.outputs[1:], sets[1 - src]):
                    binding.bind_ortvalue_output(name, value)
                pair.append(binding)
            self._decode_bindings[self.home] = pair
        return self._decode_bindings[self.home]

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        mask = torch.ones_like(ids) if mask is None else mask.long()
        ids, mask = ids.contiguous().numpy(), mask.contiguous().numpy()
        if not self.bind:
            logits, self.state = self.session(ids, mask, self.state)
            return torch.from_numpy(logits[:, -1])
        run = self.session.session
        binding = run.io_binding()  # a chunk of any length: its logits in a buffer onnxruntime allocates
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        inputs, outputs = list(self._values[self.current]), list(self._values[1 - self.current])
        for i in self.late:  # read the home buffers, write the others (which become home)
            inputs[i], outputs[i] = self._values[self.home][i], self._values[1 - self.home][i]
        for name, value in zip(self.session.inputs, inputs):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.session.outputs[1:], outputs):
            binding.bind_ortvalue_output(name, value)
        run.run_with_iobinding(binding)
        self.current, self.home = 1 - self.current, 1 - self.home
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
        """The cache folder's name for this export: the model key, and the quantization."""
        return self.key if self.quantize is None else f"{self.key}-{self.quantize}"

    @property
    def folder(self) -> Path:
        return onnx_cache_dir() / self.name

    def cached(self) -> bool:
        """Whether the cache holds this model's export as it was written (`mismatch`, checked once per engine).
        A folder that fails the check is removed, and why is kept in `stale` for the caller to say."""
        if self._verified:
            return True
        if not _holds_exports(onnx_cache_dir()):  # nothing cached at all: no need to hash the weights for the key
            return False
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
        seconds taken. Raises on failure. A quantized engine quantizes the cached float32 export, exporting that
        first when it is not cached."""
        from wiola.export.to_onnx import export_onnx

        start = time.perf_counter()
        plain = None
        if self.quantize is not None:
            plain = OnnxEngine(self.model)
            plain._key = self.key
            if not plain.cached():
                plain.export()
        if plain is None:
            self._install(lambda tmp: export_onnx(self.model, tmp / "no-tokenizer", tmp))
        else:
            from wiola.export.onnx_quant import quantize_folder

            self._install(lambda tmp: quantize_folder(plain.folder, tmp, self.quantize))
        self.export_s = time.perf_counter() - start
        return self.export_s

    def adopt(self, folder: Path) -> Path:
        """Place a finished `wiola export --to onnx` folder of this model (with this engine's quantization) into the
        cache, so that `engine="auto"` finds it; returns the cache folder. A verified export already there stays."""
        from wiola.export.onnx_quant import quantized_kind

        kind = quantized_kind(folder)
        if kind != self.quantize:
            raise ValueError(f"{folder} holds the {_kind(kind)} export, not the {_kind(self.quantize)} one")
        if not self.cached():
            self._install(lambda tmp: [shutil.copy2(p, tmp / p.name) for p in sorted(Path(folder).iterdir())
                                       if p.is_file() and not p.is_symlink() and p.name != RECORD])
        return self.folder

    def _install(self, write) -> None:
        """`write(tmp)` fills a temporary folder in the cache, which is sealed (`seal`) and renamed to `folder`."""
        root = onnx_cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}-{os.getpid()}-", dir=root))  # the PID: `caches.remove_leftovers`
        try:
            write(tmp)
            seal(tmp, self.key, self.quantize)
            try:
                os.replace(tmp, self.folder)
                self._verified = True
            except OSError:  # the folder exists: another process exported the same key first, or it is stale
                if not self.cached():  # stale (`cached` removed it): take its place
                    os.replace(tmp, self.folder)
                    self._verified = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune(root)

    def _prune(self, root: Path) -> None:
        """Keep the `KEEP_EXPORTS` most recently used exports (`start` marks a use); remove killed exports' leftovers."""
        exports = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "shown"),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in exports[KEEP_EXPORTS:]:
            shutil.rmtree(old, ignore_errors=True)
        caches.remove_leftovers(root)

    def session(self):
        """The onnxruntime session over the cached export (`OnnxStepSession`, loaded once); raises when it does not load."""
        if self._session is None:
            from wiola.export.onnx_run import OnnxStepSession

            try:
                os.utime(self.folder)  # used: the last to be pruned
            except OSError:
                pass

            self._session = OnnxStepSession(self.folder, threads=torch.get_num_threads())
        return self._session

    def start(self, batch: int, capacity: int) -> OnnxRun:
        return OnnxRun(self.session(), batch, capacity)
