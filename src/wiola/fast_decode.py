"""Fast decoding: a preallocated cache and a single-token step driven by a plain loop.

`StaticDecoder` serves `wiola generate` and `wiola bench`. The prompt runs once through the ordinary
forward; every later token runs one step function that reads and writes only fixed buffers of a
`WiolaStaticCache`. Compiled, that step is `torch.compile`d with `fullgraph=True` — on CUDA in mode
"reduce-overhead", which captures it as a CUDA graph and replays it each token (the Python overhead and
kernel launches of a small model's step are what limit batch-1 decoding); on CPU by inductor with
freezing and the C++ wrapper (`wiola.cpu_decode`). `compile="auto"` compiles on CUDA only; on CPU compiling
is opt-in (`compile=True`, `--compile on`). With `quantize="int8"` on the torch engine the decoder runs an
int8 copy of the model (`wiola.quantize`); with `quantize="int8"|"int4"` on the ONNX engine, the export with
block-wise weights (`wiola.export.onnx_quant`).

On CPU the step can also run the model's ONNX export under onnxruntime (`wiola.onnx_decode`), by one rule:
`engine="auto"` (the default) uses onnxruntime when this model's export is in the engine cache and
onnxruntime is installed, else torch eager; `engine="onnx"` (and `quantize`) export into the cache when
the export is missing. `wiola export --to onnx` fills the same cache, so the `wiola generate` after it is fast.
Greedy and sampled decoding (temperature, top-k, top-p, seeded), batch 1 or batched, with an optional
end-of-sequence stop and a transformers streamer. `model.generate(..., cache_implementation="static")` runs
the same cache and step under transformers' own loop.

`CompiledStep` and `pick_next` are shared with the LLaMA reference loop of `wiola bench`.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Literal

import torch

from . import cpu_decode, onnx_decode
from .cache_wiola import WiolaStaticCache
from .errors import WiolaError
from .quantize import check_quantize, quantize_int8, torchao_available


class CompiledStep:
    """Wrap a decode-step function: eager, or `torch.compile`d (fullgraph, static shapes; CUDA graphs on
    CUDA, freezing and the C++ wrapper on CPU — `wiola.cpu_decode.CPU_INDUCTOR_OPTIONS`).

    With CUDA graphs each call starts a new graph step and clones the outputs, whose memory the next
    replay reuses."""

    def __init__(self, fn: Callable, compile: bool, device: torch.device, backend: str = "inductor"):
        self.graphs = compile and device.type == "cuda" and backend == "inductor"
        if compile:
            options = dict(cpu_decode.CPU_INDUCTOR_OPTIONS) if device.type == "cpu" and backend == "inductor" else None
            fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode="reduce-overhead" if self.graphs else None, options=options)
        self.fn = fn

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self.fn(*args, **kwargs).clone()
        return self.fn(*args, **kwargs)


def pick_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits `[B, V]`: argmax, or a sample after temperature, top-k and top-p
    filtering (applied in that order, as transformers' logits warpers do). Returns `[B]` long."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class StaticDecoder:
    """Decode from a `WiolaForCausalLM` on a preallocated cache of `max_cache_len` slots.

    The engine, by one rule: on CPU, `engine="auto"` decodes on onnxruntime when this model's export is in the
    engine cache (`wiola.onnx_decode`: made by `wiola export --to onnx`, or by an earlier `engine="onnx"` or
    `quantize` run) and onnxruntime is installed; otherwise on torch eager. `auto` itself never times, never
    compiles on CPU and never exports. `engine="onnx"` (CPU, float32 model) exports the model into the cache
    when its export is missing; so does `quantize` ("int8" / "int4": the export with block-wise 8-/4-bit
    weights, `wiola.export.onnx_quant`, cached beside the float32 one) on `auto`. `engine="torch"`, or
    `compile` True or False, decodes on torch (int8 there: PyTorch's dynamic quantization, `wiola.quantize` —
    eager steps on PyTorch's int8 kernels, compiled steps on torchao's when it is installed, else eager; int4
    does not exist there). Without onnxruntime, or when the export fails, the decoder says so in one line
    (`verbose`, or always when the onnx engine was asked for) and decodes on torch; int4 then raises a
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
        self.backend, self.verbose = backend, verbose
        self.engine = self._check_engine(engine, compile)
        # the model the eager steps (and the prompt) run on: PyTorch's int8 kernels trace in no compiler
        self.eager_model = quantize_int8(model, "torch") if self.quantize == "int8" else model
        compilable = not self.quantize or backend != "inductor" or torchao_available()
        if compile is True and not compilable:
            raise ValueError("a compiled int8 step needs torchao (pip install torchao); decode int8 eagerly (--compile off, compile=False)")
        self.mode = "on" if (compile is True or (compile == "auto" and self.device.type == "cuda" and not self.quantize)) else "off"
        self.eager_step = CompiledStep(self._step_fn(self.eager_model), False, self.device)
        self._compiled: CompiledStep | None = None
        self._compiled_batch: int | None = None
        self.last_path: str = "eager"  # what the last generate call ran: eager, compiled or onnx
        self.compile_s: float | None = None  # seconds the last compile took
        self.onnx: onnx_decode.OnnxEngine | None = None  # set while the ONNX engine may run
        if self.engine == "onnx" or (self.engine == "auto" and compile == "auto" and self.device.type == "cpu"
                                     and next(model.parameters()).dtype == torch.float32):
            lacking = onnx_decode.missing(export=False)
            if not lacking:
                self.onnx = onnx_decode.OnnxEngine(model, self.quantize)
            elif self.quantize == "int4":
                raise WiolaError(f"int4 weights run on the onnx engine, which needs {', '.join(lacking)}: pip install 'wiola[export]'")
            elif self._insisted() or (self.verbose and onnx_decode.first_time("missing-onnxruntime")):  # the auto engine's hint: once per machine
                self._note(f"note: {', '.join(lacking)} is not installed, so decoding runs on torch"
                           + (" with torch's int8 weights" if self.quantize else "")
                           + " (pip install 'wiola[export]' for the faster ONNX engine on CPU)"
                           + ("" if self._insisted() else "; shown once"), always=True)

    def _check_engine(self, engine: str, compile) -> str:
        if engine not in ("auto", "torch", "onnx"):
            raise ValueError(f"engine must be 'auto', 'torch' or 'onnx', got {engine!r}")
        if self.quantize == "int4":  # one engine has int4 weights: auto means it
            if engine == "torch":
                raise ValueError("int4 weights run on the onnx engine only (onnxruntime's MatMulNBits); use engine 'onnx' or 'auto'")
            engine = "onnx"
        if engine == "onnx":
            if self.device.type != "cpu":
                raise ValueError(f"the onnx engine runs on CPU only (the model is on {self.device.type}); use engine 'torch' or 'auto'")
            if compile is True:
                raise ValueError("compile applies to the torch engine; the onnx engine takes compile 'auto' or off")
            if next(self.model.parameters()).dtype != torch.float32:
                raise ValueError(f"the onnx engine needs a float32 model, this one is {next(self.model.parameters()).dtype}")
        return engine

    # kept for callers of the earlier API: the step the decoder runs on torch
    @property
    def step(self) -> CompiledStep:
        return self._compiled_step() if self.mode == "on" else self.eager_step

    def _step_fn(self, model) -> Callable:
        cache = self.cache

        def step(tokens: torch.Tensor) -> torch.Tensor:
            return model(input_ids=tokens, cache=cache, use_cache=True).logits[:, -1]

        return step

    def _compiled_step(self) -> CompiledStep:
        if self._compiled is None:
            model = self.model
            if self.quantize and self.backend == "inductor":
                model = quantize_int8(self.model, "torchao")
            elif self.quantize:  # trace-only backends (tests): the eager int8 model's fp32 twin is not wanted; trace the int8 one
                model = self.eager_model
            self._compiled = CompiledStep(self._step_fn(model), True, self.device, self.backend)
        return self._compiled

    def _signature(self, batch: int) -> str:
        return cpu_decode.signature(self.model, batch, self.cache.capacity, f"{self.quantize}/{self.backend}", torch.get_num_threads())

    def _note(self, text: str, always: bool = False) -> None:
        if self.verbose or always:
            print(f"wiola: {text}", file=sys.stderr, flush=True)

    def _timed_compile(self, token: torch.Tensor) -> torch.Tensor:
        """First call of the compiled step: compiles (timed, `compile_s`). On CPU with inductor, torch's cache
        artifacts saved for this signature are loaded first and saved after (`wiola.cpu_decode`)."""
        sig = self._signature(token.shape[0]) if self.device.type == "cpu" and self.backend == "inductor" else None
        if sig is not None:
            cpu_decode.load_artifacts(sig)
        self._note("compiling the decode step (the first time here: up to a minute; then cached)")
        start = time.perf_counter()
        logits = self._compiled_step()(token)
        self.compile_s = time.perf_counter() - start
        if sig is not None:
            cpu_decode.save_artifacts(sig)
        return logits

    def _insisted(self) -> bool:
        """Whether the onnx engine was asked for by name, or by quantized weights (on auto): it exports when the
        export is missing, and its fallbacks are said."""
        return self.engine == "onnx" or self.quantize is not None

    def _onnx_ready(self) -> bool:
        """Whether this run decodes on onnxruntime (the rule in the class docstring): the export is cached, or —
        the engine asked for — made now."""
        if self.onnx is None:
            return False
        if self.onnx.cached():
            return True
        if self.onnx.stale is not None:  # a cached folder that was not this model's export (`OnnxEngine.cached`): removed
            reason, self.onnx.stale = self.onnx.stale, None
            then = f"exporting it again (about {onnx_decode.COLD_EXPORT_S:.0f} s)" if self._insisted() else \
                "decoding on torch (wiola export --to onnx, or --engine onnx, makes it again)"
            self._note(f"note: the cached ONNX export {self.onnx.folder} is not this model's ({reason}); {then}", always=True)
            return self._insisted() and self._export(announce=False)
        return self._insisted() and self._export()

    def _export(self, announce: bool = True) -> bool:
        """Export for the onnx engine (once per set of weights); on failure say why in one line and drop the engine.
        `announce`: say (verbose) that it exports."""
        lacking = onnx_decode.missing(export=True)
        if lacking:
            self._fall_back(f"exporting for the onnx engine needs {', '.join(lacking)} (pip install 'wiola[export]')")
            return False
        if announce:
            kind = f" with {self.quantize} weights" if self.quantize else ""
            self._note(f"exporting the model to ONNX{kind} for the faster CPU engine (once for these weights, about "
                       f"{onnx_decode.COLD_EXPORT_S:.0f} s; cached in {onnx_decode.onnx_cache_dir()})")
        try:
            self.onnx.export()
        except Exception as exc:
            reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:200]
            self._fall_back(f"the ONNX export failed ({type(exc).__name__}: {reason})")
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

    def _start_onnx(self, batch: int) -> onnx_decode.OnnxRun | None:
        """The onnxruntime state of a run; None (with a one-line note, the engine dropped) when the cached export does not load."""
        try:
            return self.onnx.start(batch, self.cache.capacity)
        except Exception as exc:
            reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:200]
            self._fall_back(f"onnxruntime could not load {self.onnx.folder} ({type(exc).__name__}: {reason})",
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
        ort = self._start_onnx(batch) if self._onnx_ready() else None
        if ort is not None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            logits = ort.prefill(input_ids, mask)
            step = ort
        else:
            self.cache.reset()
            logits = self.eager_model(input_ids=input_ids, attention_mask=attention_mask, cache=self.cache, use_cache=True).logits[:, -1]
            step = self.eager_step
            if self.mode == "on":
                step = self._compiled_step() if self._compiled_batch == batch else None  # None: compile at the first step
        if streamer is not None:
            streamer.put(input_ids.cpu())
        pad = pad_token_id if pad_token_id is not None else eos_token_id
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        out = [input_ids]
        for i in range(max_new_tokens):
            token = pick_next(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= token == eos_token_id
            out.append(token[:, None])
            if streamer is not None:
                streamer.put(token.cpu())
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            if step is None:
                logits = self._timed_compile(token[:, None])
                self._compiled_batch, step = batch, self._compiled
                continue
            logits = step(token[:, None])
        self.last_path = "onnx" if ort is not None else "compiled" if self.mode == "on" else "eager"
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)
