"""Fast decoding: a preallocated cache and a compiled single-token step driven by a plain loop.

`StaticDecoder` serves `wiola generate` and `wiola bench`. The prompt runs once through the ordinary
forward; every later token runs one step function that reads and writes only fixed buffers of a
`WiolaStaticCache`. Compiled, that step is `torch.compile`d with `fullgraph=True` — on CUDA in mode
"reduce-overhead", which captures it as a CUDA graph and replays it each token (the Python overhead and
kernel launches of a small model's step are what limit batch-1 decoding); on CPU by inductor with
freezing and the C++ wrapper (`wiola.cpu_decode`). `compile="auto"` compiles on CUDA, and on CPU only
when the run is long enough to pay the compile time back (timed on the run's first steps). With
`quantize="int8"` on the torch engine the decoder runs an int8 copy of the model (`wiola.quantize`); with
`quantize="int8"|"int4"` on the ONNX engine, the export with block-wise weights (`wiola.export.onnx_quant`). On CPU the decoder can
also run the model's ONNX export under onnxruntime (`engine`, `wiola.onnx_decode`): the same loop, with
the step's logits coming from onnxruntime (`engine="auto"`, the default, picks it when it is faster and
its one-off export pays back or is cached). Greedy and sampled
decoding (temperature, top-k, top-p, seeded), batch 1 or batched, with an optional end-of-sequence stop
and a transformers streamer. `model.generate(..., cache_implementation="static")` runs the same cache
and step under transformers' own loop.

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

    `compile`: False (eager), True (compiled from the first step) or "auto" (default: compiled on CUDA;
    on CPU the first `cpu_decode.PROBE_STEPS` steps run eagerly and the rest compiled when that pays back —
    `wiola.cpu_decode`). `backend`: the `torch.compile` backend. `quantize`: None, "int8" or "int4" (CPU only).
    On the onnx engine both are the export with block-wise 8-/4-bit weights (`wiola.export.onnx_quant`, cached
    beside the float32 export); on the torch engine int8 is PyTorch's dynamic quantization (`wiola.quantize`:
    eager steps on PyTorch's int8 kernels, compiled steps on torchao's when it is installed — without it an int8
    decoder stays eager), and int4 does not exist there. `engine`: "torch", "onnx" (CPU, float32 model: the
    model's ONNX export under onnxruntime, exported on first use and cached — `wiola.onnx_decode`) or "auto"
    (default: with `compile="auto"` on CPU, onnx when the ledger says it is faster and its export is cached
    or pays back, else torch — and with `quantize`, onnx whenever onnxruntime is installed; with `compile`
    True or False, torch). Without onnxruntime, or when the export fails, the decoder says so (`verbose`) and
    decodes on torch (int8: torch's int8); int4 then raises a one-line `WiolaError`. `verbose`: say on stderr
    when and why the step compiles, exports or changes engine.

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
        if compile == "auto":
            self.mode = "on" if self.device.type == "cuda" and not self.quantize else "auto" if self.device.type == "cpu" and compilable else "off"
        else:
            self.mode = "on" if compile else "off"
        self.eager_step = CompiledStep(self._step_fn(self.eager_model), False, self.device)
        self._compiled: CompiledStep | None = None
        self._compiled_batch: int | None = None
        self.last_path: str = "eager"  # what the last generate call ran: eager, compiled, eager+compiled, onnx or eager+onnx
        self.compile_s: float | None = None  # seconds the last compile took (CPU, inductor)
        self.onnx: onnx_decode.OnnxEngine | None = None  # set while the ONNX engine may run
        if self.engine == "onnx" or (self.engine == "auto" and compile == "auto" and self.device.type == "cpu"
                                     and next(model.parameters()).dtype == torch.float32):
            lacking = onnx_decode.missing(export=False)
            if not lacking:
                self.onnx = onnx_decode.OnnxEngine(model, self.quantize)
            elif self.quantize == "int4":
                raise WiolaError(f"int4 weights run on the onnx engine, which needs {', '.join(lacking)}: pip install 'wiola[export]'")
            elif self.engine == "onnx" or self.quantize or (self.verbose and onnx_decode.first_time("missing-onnxruntime")):  # the auto engine's hint: once per machine
                self._note(f"note: {', '.join(lacking)} is not installed, so decoding runs on torch"
                           + (" with torch's int8 weights" if self.quantize else "")
                           + " (pip install 'wiola[export]' for the faster ONNX engine on CPU)"
                           + ("" if self.engine == "onnx" or self.quantize else "; shown once"), always=True)

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

    # kept for callers of the earlier API: the step the decoder starts with
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

    def _timed_compile(self, token: torch.Tensor, sig: str | None) -> torch.Tensor:
        """First call of the compiled step (compiles; on CPU with inductor also times it, records it and
        saves torch's cache artifacts)."""
        persist = sig is not None and self.backend == "inductor"  # torch's artifacts: inductor's caches
        if persist:
            cpu_decode.load_artifacts(sig)
        start = time.perf_counter()
        logits = self._compiled_step()(token)
        self.compile_s = time.perf_counter() - start
        if sig is not None:
            cpu_decode.Ledger().update(sig, compile_s=self.compile_s)
        if persist:
            cpu_decode.save_artifacts(sig)
        return logits

    def _onnx_signature(self, batch: int) -> str:
        tag = "engine" if self.quantize is None else f"engine/{self.quantize}"
        return cpu_decode.signature(self.model, batch, self.cache.capacity, tag, torch.get_num_threads())

    def _insisted(self) -> bool:
        """Whether the onnx engine was asked for by name, or by quantized weights (on auto): its fallbacks are said."""
        return self.engine == "onnx" or self.quantize is not None

    def _onnx_plan(self, batch: int, max_new_tokens: int) -> str | None:
        """Before a run (`wiola.onnx_decode`): "onnx" (from the prompt on), "probe" (decide after the timed
        eager steps) or None (torch)."""
        if self.onnx is None:
            return None
        if self._insisted():  # by name, or quantized: from the prompt on, whatever the ledger
            return "onnx" if self._cached_export() or self._export(onnx_decode.expected_export_s(onnx_decode.ledger().read())) else None
        if max_new_tokens < cpu_decode.PROBE_STEPS + 3:  # too short to time, or to win back the session's start
            return None
        cached = self._cached_export()
        if self.onnx is None:  # a wrong cached folder whose export failed again
            return None
        record = onnx_decode.ledger().get(self._onnx_signature(batch))
        if cached:
            if record.get("eager_ms") and record.get("onnx_ms"):
                return "onnx" if record["onnx_ms"] < record["eager_ms"] else None
        elif onnx_decode.missing(export=True) or self.onnx.failed_before():
            return None
        return "probe"

    def _cached_export(self) -> bool:
        """Whether this model's export is cached. A cached folder that is not (`OnnxEngine.cached`: another model's
        export under this key, or edited since) has been removed: say so in one line and export again."""
        if self.onnx.cached():
            return True
        if self.onnx.stale is None:
            return False
        reason, self.onnx.stale = self.onnx.stale, None
        expected_s = onnx_decode.expected_export_s(onnx_decode.ledger().read())
        self._note(f"note: the cached ONNX export {self.onnx.folder} is not this model's ({reason}); exporting it again "
                   f"(about {expected_s:.0f} s)", always=True)
        return self._export(expected_s, announce=False)

    def _switch_to_onnx(self, batch: int, eager_ms: float, steps: int) -> bool:
        """After the probe: onnxruntime for the rest of the run? (A cached export: yes, to time it; else export
        when that pays back — rent or buy, `onnx_decode.export_pays_back`.)"""
        if self.onnx.cached():
            return True
        records = onnx_decode.ledger().read()
        mine = records.get(self.onnx.key, {})
        saving = onnx_decode.saving_ms(records.get(self._onnx_signature(batch), {}), batch, eager_ms)
        export_s = mine.get("export_s") or onnx_decode.expected_export_s(records)
        forgone = mine.get("forgone_s", 0.0)
        if onnx_decode.export_pays_back(forgone, export_s, saving, steps):
            return self._export(export_s)
        if saving > 0:
            onnx_decode.add_forgone(self.onnx.key, steps * saving / 1000.0)
        return False

    def _export(self, expected_s: float, announce: bool = True) -> bool:
        """Export for the onnx engine (once per set of weights); on failure say why in one line and drop the engine.
        `announce`: say (verbose) that it exports."""
        forced = self._insisted()
        lacking = onnx_decode.missing(export=True)
        if lacking:
            self._fall_back(f"exporting for the onnx engine needs {', '.join(lacking)} (pip install 'wiola[export]')", forced)
            return False
        if announce:
            kind = f" with {self.quantize} weights" if self.quantize else ""
            self._note(f"exporting the model to ONNX{kind} for the faster CPU engine (once for these weights, about {expected_s:.0f} s; "
                       f"cached in {onnx_decode.onnx_cache_dir()})")
        try:
            self.onnx.export()
        except Exception as exc:
            reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:200]
            self._fall_back(f"the ONNX export failed ({type(exc).__name__}: {reason})", forced)
            return False
        return True

    def _fall_back(self, why: str, say: bool, after: str = "") -> None:
        """Drop the onnx engine, saying why in one line (`say`, else only when verbose); int4 has no torch engine: raise."""
        self.onnx = None
        if self.quantize == "int4":
            raise WiolaError(f"int4 weights need the onnx engine, and {why}")
        torch_engine = "torch's int8" if self.quantize else "torch"
        self._note(f"note: {why}; decoding on {torch_engine}{after}", say)

    def _start_onnx(self, batch: int) -> onnx_decode.OnnxRun | None:
        """The onnxruntime state of a run; None (with a one-line note, the engine dropped) when the cached export does not load."""
        try:
            return self.onnx.start(batch, self.cache.capacity)
        except Exception as exc:
            reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:200]
            self._fall_back(f"onnxruntime could not load {self.onnx.folder} ({type(exc).__name__}: {reason})", self._insisted(),
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
        sig = self._signature(batch) if self.device.type == "cpu" and self.mode != "off" else None
        mode = self.mode
        if mode == "auto" and self._compiled is not None and self._compiled_batch == batch:
            mode = "on"  # compiled by an earlier call for this batch: nothing left to pay
        plan = self._onnx_plan(batch, max_new_tokens) if mode != "on" else None
        ort, ort_calls, ort_start = None, 0, None
        if plan == "onnx":  # the prompt too
            ort = self._start_onnx(batch)
            plan = plan if ort is not None else None
        if ort is not None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            logits = ort.prefill(input_ids, mask)
        else:
            self.cache.reset()
            logits = self.eager_model(input_ids=input_ids, attention_mask=attention_mask, cache=self.cache, use_cache=True).logits[:, -1]
        if streamer is not None:
            streamer.put(input_ids.cpu())
        pad = pad_token_id if pad_token_id is not None else eos_token_id
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        out = [input_ids]
        compiled_from = 0 if mode == "on" else None  # the step index from which the compiled step runs
        onnx_from = 0 if ort is not None else None  # ... and the onnxruntime step
        deciding = ort is None and (mode == "auto" or plan == "probe")
        probe_start = timed_from = steps_start = eager_ms = None
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
            if deciding:  # time PROBE_STEPS eager steps (after one warm-up step), then decide once
                if i == 1:
                    probe_start = time.perf_counter()
                elif i == 1 + cpu_decode.PROBE_STEPS:
                    deciding = False
                    eager_ms = (time.perf_counter() - probe_start) * 1000 / cpu_decode.PROBE_STEPS
                    remaining = max_new_tokens - 1 - i
                    if plan == "probe" and self._switch_to_onnx(batch, eager_ms, max_new_tokens) and (ort := self._start_onnx(batch)):
                        self._note(f"decoding the remaining {remaining} tokens with onnxruntime")
                        onnx_from = i
                        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
                        logits = ort.prefill(torch.cat(out, dim=1), torch.cat([mask, mask.new_ones(batch, i + 1)], dim=1))
                        continue
                    if mode == "auto":
                        record = cpu_decode.Ledger().get(sig)
                        mode = "on" if cpu_decode.compile_pays_back(record, eager_ms, remaining) else "off"
                        if mode == "on":
                            compiled_from = i
                            cost = f"about {record['compile_s']:.0f} s, cached" if "compile_s" in record else "the first time here: up to a minute"
                            self._note(f"compiling the decode step for the remaining {remaining} tokens ({cost})")
            if ort is not None:
                if ort_calls == 1:  # the first call of a one-token step warms onnxruntime up: not timed
                    ort_start = time.perf_counter()
                logits = ort(token[:, None])
                ort_calls += 1
                continue
            if compiled_from is not None and i == compiled_from and self._compiled_batch != batch:
                logits = self._timed_compile(token[:, None], sig)
                self._compiled_batch = batch
                timed_from, steps_start = i + 1, time.perf_counter()
                continue
            if compiled_from is not None and i == compiled_from:
                timed_from, steps_start = i, time.perf_counter()
            logits = (self._compiled if compiled_from is not None else self.eager_step)(token[:, None])
        if sig is not None and timed_from is not None and self.compile_s is not None:
            steps = len(out) - 2 - timed_from  # compiled steps timed (the compiling call excluded)
            if steps >= cpu_decode.PROBE_STEPS:
                fields = dict(compiled_ms=(time.perf_counter() - steps_start) * 1000 / steps)
                if eager_ms is not None:
                    fields["eager_ms"] = eager_ms
                cpu_decode.Ledger().update(sig, **fields)
        if plan is not None:  # the engines' step times, for the next run's choice
            fields = dict(eager_ms=eager_ms) if eager_ms is not None else {}
            if ort_calls - 1 >= cpu_decode.PROBE_STEPS:
                fields["onnx_ms"] = (time.perf_counter() - ort_start) * 1000 / (ort_calls - 1)
            if fields:
                onnx_decode.ledger().update(self._onnx_signature(batch), **fields)
        if onnx_from is not None:
            self.last_path = "onnx" if onnx_from == 0 and plan == "onnx" else "eager+onnx"
        else:
            self.last_path = "eager" if compiled_from is None else "compiled" if compiled_from == 0 else "eager+compiled"
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)
