"""Fast decoding: a preallocated cache and a compiled single-token step driven by a plain loop.

`StaticDecoder` serves `wiola generate` and `wiola bench`. The prompt runs once through the ordinary
forward; every later token runs one step function that reads and writes only fixed buffers of a
`WiolaStaticCache`. With `compile=True` that step is `torch.compile`d with `fullgraph=True` — on CUDA in
mode "reduce-overhead", which captures it as a CUDA graph and replays it each token (the Python overhead
and kernel launches of a small model's step are what limit batch-1 decoding). Greedy and sampled
decoding (temperature, top-k, top-p, seeded), batch 1 or batched, with an optional end-of-sequence stop
and a transformers streamer. `model.generate(..., cache_implementation="static")` runs the same cache
and step under transformers' own loop.

`CompiledStep` and `pick_next` are shared with the LLaMA reference loop of `wiola bench`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .cache_wiola import WiolaStaticCache


class CompiledStep:
    """Wrap a decode-step function: eager, or `torch.compile`d (fullgraph; CUDA graphs on CUDA).

    With CUDA graphs each call starts a new graph step and clones the outputs, whose memory the next
    replay reuses."""

    def __init__(self, fn: Callable, compile: bool, device: torch.device, backend: str = "inductor"):
        self.graphs = compile and device.type == "cuda" and backend == "inductor"
        if compile:
            fn = torch.compile(fn, fullgraph=True, backend=backend, mode="reduce-overhead" if self.graphs else None)
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

    Build it once and call `generate` as often as needed: the cache buffers and the compiled step are
    reused while the batch size stays the same (a new batch size reallocates and, compiled, recompiles).
    """

    def __init__(self, model, max_cache_len: int | None = None, compile: bool = False, backend: str = "inductor"):
        if not hasattr(model, "config") or getattr(model.config, "model_type", None) != "wiola":
            raise ValueError("StaticDecoder needs a WiolaForCausalLM")
        self.model = model
        self.cache = WiolaStaticCache(model.config, max_cache_len=max_cache_len)
        self.device = next(model.parameters()).device
        self.step = CompiledStep(self._step, compile, self.device, backend)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, cache=self.cache, use_cache=True).logits[:, -1]

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
        self.cache.reset()
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=self.cache, use_cache=True).logits[:, -1]
        if streamer is not None:
            streamer.put(input_ids.cpu())
        pad = pad_token_id if pad_token_id is not None else eos_token_id
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=self.device)
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
            logits = self.step(token[:, None])
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)
