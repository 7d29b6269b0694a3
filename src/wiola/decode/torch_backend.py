"""The torch backend of `wiola.decode`: the model's own forward on a preallocated `WiolaStaticCache`, each step
eager or `torch.compile`d (fullgraph, static shapes; on CUDA a CUDA graph, on CPU inductor with freezing and the
C++ wrapper, `caches.CPU_INDUCTOR_OPTIONS`), on the model's weights or an int8 copy (`wiola.quantize`: eager steps
on PyTorch's int8 kernels, compiled ones on torchao's).

`TorchBackend` holds what outlives a run (the int8 copy, the compiled step); `TorchBackend.start(batch)` gives a
run with the step interface of `loop.decode_loop`.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..quantize import quantize_int8
from . import caches


class CompiledStep:
    """Wrap a decode-step function: eager, or `torch.compile`d (fullgraph, static shapes; CUDA graphs on
    CUDA, freezing and the C++ wrapper on CPU — `caches.CPU_INDUCTOR_OPTIONS`).

    With CUDA graphs each call starts a new graph step and clones the outputs, whose memory the next
    replay reuses."""

    def __init__(self, fn: Callable, compile: bool, device: torch.device, backend: str = "inductor"):
        self.graphs = compile and device.type == "cuda" and backend == "inductor"
        if compile:
            options = dict(caches.CPU_INDUCTOR_OPTIONS) if device.type == "cpu" and backend == "inductor" else None
            fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode="reduce-overhead" if self.graphs else None, options=options)
        self.fn = fn

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self.fn(*args, **kwargs).clone()
        return self.fn(*args, **kwargs)


class TorchBackend:
    """Steps of `model` on `cache`: eager, or compiled (`compile`, with `torch.compile` backend `backend`) from
    the first step of a run. `quantize="int8"`: an int8 copy (the fp32 model is left alone). `note(text)` is told
    when the step compiles."""

    def __init__(self, model, cache, compile: bool, backend: str = "inductor", quantize: str | None = None, note=None):
        self.model, self.cache, self.compile, self.backend, self.quantize = model, cache, compile, backend, quantize
        self.device = next(model.parameters()).device
        self.note = note or (lambda text: None)
        # the model the eager steps (and the prompt) run on: PyTorch's int8 kernels trace in no compiler
        self.eager_model = quantize_int8(model, "torch") if quantize == "int8" else model
        self.eager_step = CompiledStep(self._step_fn(self.eager_model), False, self.device)
        self.compiled: CompiledStep | None = None
        self.compiled_batch: int | None = None
        self.compile_s: float | None = None  # seconds the last compile took

    def _step_fn(self, model) -> Callable:
        cache = self.cache

        def step(tokens: torch.Tensor) -> torch.Tensor:
            return model(input_ids=tokens, cache=cache, use_cache=True).logits[:, -1]

        return step

    def compiled_step(self) -> CompiledStep:
        if self.compiled is None:
            model = self.model
            if self.quantize and self.backend == "inductor":
                model = quantize_int8(self.model, "torchao")
            elif self.quantize:  # trace-only backends (tests): the eager int8 model's fp32 twin is not wanted; trace the int8 one
                model = self.eager_model
            self.compiled = CompiledStep(self._step_fn(model), True, self.device, self.backend)
        return self.compiled

    def signature(self, batch: int) -> str:
        return caches.signature(self.model, batch, self.cache.capacity, f"{self.quantize}/{self.backend}", torch.get_num_threads())

    def timed_compile(self, token: torch.Tensor) -> torch.Tensor:
        """First call of the compiled step for a batch: compiles (timed, `compile_s`). On CPU with inductor, torch's
        cache artifacts saved for this signature are loaded first and saved after (`wiola.decode.caches`)."""
        sig = self.signature(token.shape[0]) if self.device.type == "cpu" and self.backend == "inductor" else None
        if sig is not None:
            caches.load_artifacts(sig)
        self.note("compiling the decode step (the first time here: up to a minute; then cached)")
        start = time.perf_counter()
        logits = self.compiled_step()(token)
        self.compile_s = time.perf_counter() - start
        self.compiled_batch = token.shape[0]
        if sig is not None:
            caches.save_artifacts(sig)
        return logits

    def start(self, batch: int) -> "TorchRun":
        return TorchRun(self)


class TorchRun:
    """One generate call on torch: `prefill(ids, mask)` resets the cache and runs the prompt through the eager
    model; each call runs one step (compiling it first when this batch has no compiled step yet)."""

    def __init__(self, backend: TorchBackend):
        self.backend = backend

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b = self.backend
        b.cache.reset()
        return b.eager_model(input_ids=ids, attention_mask=mask, cache=b.cache, use_cache=True).logits[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        b = self.backend
        if not b.compile:
            return b.eager_step(token)
        if b.compiled_batch != token.shape[0]:
            return b.timed_compile(token)
        return b.compiled(token)
