"""The batched decode step of `wiola serve`, on one of `wiola generate`'s engines, chosen by its rule.

On CPU, `engine="auto"` runs the step on onnxruntime when this model's ONNX export is in the engine cache
(`wiola.decode.onnx_backend`: filled at the end of `wiola train` on CPU, by `wiola export --to onnx`, or by an
earlier `--engine onnx` / `--quantize` run) and onnxruntime is installed, otherwise on torch eager;
`engine="onnx"` (or `quantize`) exports the model into the cache first when it is missing (`wiola.decode.choose`).

**No translation.** The exported step (`wiola.export.onnx_step`) takes and returns the state in the layout of a
`WiolaStaticCache`: `position [1]`, `key_real [B, L]`, `real_count [B]`, per layer keys/values `[B, H_kv, L, d_h]`,
the running sums and the ATM state, row for row. So the `SlotCache`'s own torch buffers *are* the step's state:
`OnnxSlotStep` binds them to onnxruntime by pointer (IO binding over `tensor.data_ptr()`; rows 0..B-1 of a
buffer are a contiguous block), with no copy in or out. The graph's outputs must not alias its inputs, so the
`SlotCache` holds two buffer sets (`sets=2`): a step reads the current set and writes the other, which then becomes
current (`SlotCache.swap`). `place`, `move` and `shift` edit the current set in torch as before; what they write
is what the next step reads. `state_buffers` pairs every tensor of the export's state with its buffer and
`layout_problem` checks names, shapes and dtypes once at startup: a model whose cache differs falls back to torch.

Prefill (one prompt at a time) stays on the float32 torch model in either case: its state is placed into a row
as before, and the request's first token is the torch path's. `quantize` sets the decode step's weights only.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cache_wiola import ATM_STATE, WiolaStaticCache
from ..decode import choose, onnx_backend
from ..errors import WiolaError, reason
from .slots import SlotCache

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_, torch.int64: np.int64}


def state_buffers(cache: WiolaStaticCache, names: list[str]) -> list[torch.Tensor | None]:
    """The buffer of `cache` holding each named state tensor of the ONNX step (None where the cache has none)."""
    out = []
    for name in names:
        if name in ("position", "key_real", "real_count"):
            out.append(getattr(cache, name))
            continue
        index, _, field = name.partition(".")
        layer = cache.layers[int(index)] if index.isdigit() and int(index) < len(cache.layers) else None
        if layer is None:
            out.append(None)
        elif field in ("keys", "values", *ATM_STATE):
            out.append(getattr(layer, field))
        else:
            out.append(layer.sums.get(field))
    return out


def layout_problem(session, slots: SlotCache) -> str | None:
    """Why the export's state is not the `SlotCache`'s buffers, name for name, shape for shape (None: it is)."""
    spec = session.meta["state"]
    names = [s["name"] for s in spec]
    full = slots.full
    buffers = state_buffers(full, names)
    for s, buf in zip(spec, buffers):
        if buf is None:
            return f"the serving cache has no buffer for the step's state {s['name']!r}"
        shape = tuple({"batch": slots.rows, "capacity": slots.capacity}.get(d, d) for d in s["shape"])
        dtype = np.dtype(_NUMPY.get(buf.dtype, np.void))
        if tuple(buf.shape) != shape or dtype != np.dtype(s["dtype"]) or not buf.is_contiguous() or buf.device.type != "cpu":
            return f"the step's state {s['name']!r} is {s['dtype']} {list(shape)}, the serving cache's {buf.dtype} {list(buf.shape)}"
    held = {id(b) for b in buffers}
    for i, layer in enumerate(full.layers):
        for field, buf in layer.buffers().items():
            if id(buf) not in held:
                return f"the step has no state for the serving cache's buffer {i}.{field}"
    return None


class TorchSlotStep:
    """The decode step on torch eager: the model (or its int8 copy) on a view of the `SlotCache`'s first B rows."""

    name = "torch"

    def __init__(self, model, slots: SlotCache, quantize: str | None = None):
        from ..quantize import quantize_int8

        self.model = quantize_int8(model, "torch") if quantize == "int8" else model
        self.slots = slots
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        return self.model(input_ids=ids, cache=self.slots.view(len(tokens)), use_cache=True).logits[:, -1]


class OnnxSlotStep:
    """The decode step on onnxruntime over the `SlotCache`'s own buffers (see the module docstring). One IO
    binding per (batch size, current set), made on first use; a step copies the B tokens in and nothing else.
    The logits it returns `[B, V]` are valid until the next step."""

    name = "onnx"

    def __init__(self, session, slots: SlotCache):
        if len(slots.sets) != 2:
            raise ValueError("the ONNX step needs a SlotCache of 2 buffer sets")
        self.session, self.slots = session, slots
        rows = slots.rows
        self.token = torch.zeros(rows, 1, dtype=torch.long)
        self.mask = torch.ones(rows, 1, dtype=torch.long)
        self.logits = torch.empty(rows, 1, session.meta["vocab_size"], dtype=torch.float32)
        names = [s["name"] for s in session.meta["state"]]
        self.batched = [s["shape"][:1] == ["batch"] for s in session.meta["state"]]
        self.state = [state_buffers(full, names) for full in slots.sets]
        self._bindings: dict[tuple[int, int], object] = {}

    def _binding(self, batch: int, src: int):
        key = (batch, src)
        if key not in self._bindings:
            io = self.session.session.io_binding()

            def bind(method, name: str, tensor: torch.Tensor, rows: bool = True) -> None:
                part = tensor[:batch] if rows else tensor
                method(name, "cpu", 0, _NUMPY[part.dtype], list(part.shape), part.data_ptr())

            bind(io.bind_input, "input_ids", self.token)
            bind(io.bind_input, "attention_mask", self.mask)
            for name, buf, rows in zip(self.session.inputs, self.state[src], self.batched):
                bind(io.bind_input, name, buf, rows)
            bind(io.bind_output, "logits", self.logits)
            for name, buf, rows in zip(self.session.outputs[1:], self.state[1 - src], self.batched):
                bind(io.bind_output, name, buf, rows)
            self._bindings[key] = io
        return self._bindings[key]

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        batch = len(tokens)
        self.token[:batch, 0] = torch.tensor(tokens, dtype=torch.long)
        self.session.session.run_with_iobinding(self._binding(batch, self.slots.current))
        self.slots.swap()
        return self.logits[:batch, 0]


def make_step(model, max_batch_size: int, capacity: int, engine: str = "auto", quantize: str | None = None, note=None):
    """(`SlotCache`, step, why): the serving cache and its decode step by `wiola.decode.choose`'s rule, and a short
    reason for the choice (for the startup line). `note(text)` hears each fallback from the engine asked for in one
    line. Raises `WiolaError` for int4 without the onnx engine."""
    from ..quantize import check_quantize

    note = note or (lambda text: None)
    quantize = check_quantize(quantize)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    try:
        engine = choose.check_engine(engine, quantize, "auto", device, dtype)
    except ValueError as exc:
        raise WiolaError(str(exc)) from None
    insisted = choose.may_export(engine, quantize)
    why = _torch_reason(engine, device, dtype)
    session = None
    if choose.considers_onnx(engine, "auto", device, dtype):
        session, why = _onnx_session(model, engine, quantize, insisted, note)
    if session is not None:
        slots = SlotCache(model, max_batch_size, capacity, sets=2, shared=onnx_backend.in_place_state(session, prefill=False))
        problem = layout_problem(session, slots)
        if problem is None:
            return slots, OnnxSlotStep(session, slots), why
        why = f"this model's serving cache does not match its ONNX step ({problem})"
        note(f"note: {why}; decode steps run on torch")
    if quantize == "int4":
        raise WiolaError(f"--quantize int4 needs the onnx engine, and {why}")
    slots = SlotCache(model, max_batch_size, capacity)
    return slots, TorchSlotStep(model, slots, quantize), why


def _torch_reason(engine: str, device: torch.device, dtype: torch.dtype) -> str:
    if engine == "torch":
        return "--engine torch"
    if device.type != "cpu":
        return f"the onnx engine runs on CPU, the model is on {device.type}"
    return f"the onnx engine needs a float32 model, this one is {dtype}"


def _onnx_session(model, engine: str, quantize: str | None, insisted: bool, note):
    """(onnxruntime session or None, why) for the onnx engine, by the rule of `choose` (see `make_step`)."""
    lacking = onnx_backend.missing(export=False)
    if lacking:
        why = f"{', '.join(lacking)} is not installed (pip install 'wiola[export]' for the faster ONNX engine on CPU)"
        if insisted:
            note(f"note: {why}; decode steps run on torch")
        return None, why
    onnx = onnx_backend.OnnxEngine(model, quantize)
    cached = onnx.cached()
    if not cached and onnx.stale is not None:
        note(f"note: the cached ONNX export {onnx.folder} is not this model's ({onnx.stale})"
             + ("; exporting it again" if insisted else "; decode steps run on torch"))
    plan = choose.use_onnx(cached, engine, quantize)
    if plan == "torch":
        return None, ("no ONNX export of this model in the engine cache (wiola export --to onnx, or --engine onnx, makes it)")
    kind = f" with {quantize} weights" if quantize else ""
    if plan == "export":
        lacking = onnx_backend.missing(export=True)
        if lacking:
            why = f"exporting for the onnx engine needs {', '.join(lacking)} (pip install 'wiola[export]')"
            note(f"note: {why}; decode steps run on torch")
            return None, why
        note(f"exporting the model to ONNX{kind} for the faster CPU engine (once for these weights, about "
             f"{onnx_backend.COLD_EXPORT_S:.0f} s; cached in {onnx_backend.onnx_cache_dir()})")
        try:
            onnx.export()
        except Exception as exc:
            why = f"the ONNX export failed ({type(exc).__name__}: {reason(exc, type(exc).__name__)})"
            note(f"note: {why}; decode steps run on torch")
            return None, why
    try:
        session = onnx.session()
    except Exception as exc:
        why = f"onnxruntime could not load {onnx.folder} ({type(exc).__name__}: {reason(exc, type(exc).__name__)})"
        note(f"note: {why}; decode steps run on torch (delete that folder to export again)")
        return None, why
    made = "exported just now" if plan == "export" else "in the engine cache"
    return session, f"this model's ONNX export{kind} is {made}"
