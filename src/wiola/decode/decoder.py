"""`StaticDecoder`: the chooser (`choose`), a backend (`torch_backend`, `onnx_backend`) and the token loop
(`loop`), put together. It serves `wiola generate`, `wiola chat`, `wiola bench` and the model card.

The prompt runs once; every later token runs one step that reads and writes only fixed buffers: the
`WiolaStaticCache` on torch (eager, or compiled — a CUDA graph on CUDA, inductor with freezing and the C++
wrapper on CPU), or the IO-bound state of the model's ONNX export under onnxruntime. Which one runs is the rule
of `choose`. `model.generate(..., cache_implementation="static")` runs the same cache and step under
transformers' own loop.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch

from ..cache_wiola import WiolaStaticCache
from ..errors import WiolaError, reason
from ..quantize import check_quantize, torchao_available
from . import choose, onnx_backend
from .loop import decode_loop
from .torch_backend import CompiledStep, TorchBackend


class StaticDecoder:
    """Decode from a `WiolaForCausalLM` on a preallocated cache of `max_cache_len` slots.

    The engine, by one rule (`wiola.decode.choose`): on CPU, `engine="auto"` decodes on onnxruntime when this
    model's export is in the engine cache (`wiola.decode.onnx_backend`: made at the end of `wiola train` on CPU, by
    `wiola export --to onnx`, or by an earlier `engine="onnx"` or `quantize` run) and onnxruntime is installed; otherwise on torch eager. `auto`
    itself never times, never compiles on CPU and never exports. `engine="onnx"` (CPU, float32 model) exports the
    model into the cache when its export is missing; so does `quantize` ("int8" / "int4": the export with
    block-wise 8-/4-bit weights, `wiola.export.onnx_quant`, cached beside the float32 one) on `auto`.
    `engine="torch"`, or `compile` True or False, decodes on torch (int8 there: PyTorch's dynamic quantization,
    `wiola.quantize` — eager steps on PyTorch's int8 kernels, compiled steps on torchao's when it is installed,
    else eager; int4 does not exist there). Without onnxruntime, or when the export fails, the decoder says so in
    one line (`verbose`, or always when the onnx engine was asked for) and decodes on torch; int4 then raises a
    one-line `WiolaError`.

    `compile`: True (compiled), False (eager) or "auto" (default: compiled on CUDA — a CUDA graph —, eager on
    CPU: compiling on CPU is opt-in). `backend`: the `torch.compile` backend. `verbose`: say on stderr when the
    step compiles or the model exports.

    Build it once and call `generate` as often as needed: the cache buffers and the compiled step are
    reused while the batch size stays the same (a new batch size reallocates and, compiled, recompiles).
    A compiled CPU step and the ONNX engine have the weights baked in: rebuild the decoder after changing them.
    """

    def __init__(self, model, max_cache_len: int | None = None, compile: bool | Literal["auto"] = "auto", backend: str = "inductor",
                 quantize: str | None = None, verbose: bool = False, engine: Literal["auto", "torch", "onnx"] = "auto"):
        if not hasattr(model, "config") or getattr(model.config, "model_type", None) != "wiola":
            raise ValueError("StaticDecoder needs a WiolaForCausalLM")
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        self.model = model
        self.quantize = check_quantize(quantize)
        self.cache = WiolaStaticCache(model.config, max_cache_len=max_cache_len)
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.verbose = verbose
        self.engine = choose.check_engine(engine, self.quantize, compile, self.device, dtype)
        if compile is True and self.quantize and backend == "inductor" and not torchao_available():
            raise ValueError("a compiled int8 step needs torchao (pip install torchao); decode int8 eagerly (--compile off, compile=False)")
        self.mode = "on" if choose.compiles(compile, self.device, self.quantize) else "off"
        self.torch = TorchBackend(model, self.cache, self.mode == "on", backend, self.quantize, note=self._note)
        self.last_path: str = "eager"  # what the last generate call ran: eager, compiled or onnx
        self.onnx: onnx_backend.OnnxEngine | None = None  # set while the ONNX engine may run
        if choose.considers_onnx(self.engine, compile, self.device, dtype):
            lacking = onnx_backend.missing(export=False)
            if not lacking:
                self.onnx = onnx_backend.OnnxEngine(model, self.quantize)
            elif self.quantize == "int4":
                raise WiolaError(f"int4 weights run on the onnx engine, which needs {', '.join(lacking)}: pip install 'wiola[export]'")
            elif self._insisted() or (self.verbose and onnx_backend.first_time("missing-onnxruntime")):  # the auto engine's hint: once per machine
                self._note(f"note: {', '.join(lacking)} is not installed, so decoding runs on torch"
                           + (" with torch's int8 weights" if self.quantize else "")
                           + " (pip install 'wiola[export]' for the faster ONNX engine on CPU)"
                           + ("" if self._insisted() else "; shown once"), always=True)

    # the torch backend's state, as earlier versions exposed it
    @property
    def eager_model(self):
        return self.torch.eager_model

    @property
    def eager_step(self) -> CompiledStep:
        return self.torch.eager_step

    @property
    def step(self) -> CompiledStep:
        return self.torch.compiled_step() if self.mode == "on" else self.torch.eager_step

    @property
    def compile_s(self) -> float | None:
        return self.torch.compile_s

    @property
    def _compiled(self) -> CompiledStep | None:
        return self.torch.compiled

    def _signature(self, batch: int) -> str:
        return self.torch.signature(batch)

    def _note(self, text: str, always: bool = False) -> None:
        if self.verbose or always:
            print(f"wiola: {text}", file=sys.stderr, flush=True)

    def _insisted(self) -> bool:
        return choose.may_export(self.engine, self.quantize)

    def _onnx_ready(self) -> bool:
        """Whether this run decodes on onnxruntime (`choose.use_onnx`): the export is cached, or made now."""
        if self.onnx is None:
            return False
        cached = self.onnx.cached()
        if not cached and self.onnx.stale is not None:  # a cached folder that was not this model's export: removed
            why, self.onnx.stale = self.onnx.stale, None
            then = f"exporting it again (about {onnx_backend.COLD_EXPORT_S:.0f} s)" if self._insisted() else \
                "decoding on torch (wiola export --to onnx, or --engine onnx, makes it again)"
            self._note(f"note: the cached ONNX export {self.onnx.folder} is not this model's ({why}); {then}", always=True)
            return self._insisted() and self._export(announce=False)
        plan = choose.use_onnx(cached, self.engine, self.quantize)
        return plan == "onnx" or (plan == "export" and self._export())

    def _export(self, announce: bool = True) -> bool:
        """Export for the onnx engine (once per set of weights); on failure say why in one line and drop the engine.
        `announce`: say (verbose) that it exports."""
        lacking = onnx_backend.missing(export=True)
        if lacking:
            self._fall_back(f"exporting for the onnx engine needs {', '.join(lacking)} (pip install 'wiola[export]')")
            return False
        if announce:
            kind = f" with {self.quantize} weights" if self.quantize else ""
            self._note(f"exporting the model to ONNX{kind} for the faster CPU engine (once for these weights, about "
                       f"{onnx_backend.COLD_EXPORT_S:.0f} s; cached in {onnx_backend.onnx_cache_dir()})")
        try:
            self.onnx.export()
        except Exception as exc:
            self._fall_back(f"the ONNX export failed ({type(exc).__name__}: {reason(exc, type(exc).__name__)})")
            return False
        return True

    def _fall_back(self, why: str, after: str = "") -> None:
        """Drop the onnx engine, saying why in one line (always when it was asked for, else only when verbose);
        int4 has no torch engine: raise."""
        self.onnx = None
        if self.quantize == "int4":
            raise WiolaError(f"int4 weights need the onnx engine, and {why}")
        torch_engine = "torch's int8" if self.quantize else "torch"
        self._note(f"note: {why}; decoding on {torch_engine}{after}", self._insisted())

    def _start_onnx(self, batch: int) -> onnx_backend.OnnxRun | None:
        """The onnxruntime state of a run; None (with a one-line note, the engine dropped) when the cached export does not load."""
        try:
            return self.onnx.start(batch, self.cache.capacity)
        except Exception as exc:
            self._fall_back(f"onnxruntime could not load {self.onnx.folder} ({type(exc).__name__}: {reason(exc)})",
                            " (delete that folder to export again)")
            return None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        streamer=None,
    ) -> torch.Tensor:
        """Prompt ids `[B, n]` (left-padded with `attention_mask` for ragged batches) → `[B, n + new]`.

        Rows that produced `eos_token_id` continue with `pad_token_id` (default: the eos id) and
        generation stops early once every row has; without an eos id no step waits on the device."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, prompt_len] with prompt_len ≥ 1, got {tuple(input_ids.shape)}")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.cache.capacity:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the cache of {self.cache.capacity} slots")
        self.model.eval()
        generator = None
        if do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        input_ids = input_ids.to(self.device)
        batch = input_ids.shape[0]
        run = self._start_onnx(batch) if self._onnx_ready() else None
        self.last_path = "onnx" if run is not None else "compiled" if self.mode == "on" else "eager"
        if run is None:
            run = self.torch.start(batch)
        return decode_loop(run, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                           eos_token_id, pad_token_id, generator, streamer)
