"""The token loop of `wiola.decode`, shared by every backend: pick the next token (greedy, or sampled after
temperature, top-k and top-p, seeded), stop rows at the end-of-sequence token and pad them after it, stream.

A backend's run is anything with `prefill(ids, mask) -> logits [B, V]` (the prompt, once) and
`__call__(token [B, 1]) -> logits [B, V]` (one step): `torch_backend.TorchRun`, `onnx_backend.OnnxRun`.
"""

from __future__ import annotations

import torch


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


def decode_loop(run, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, do_sample: bool = False,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                pad_token_id: int | None = None, generator: torch.Generator | None = None, streamer=None) -> torch.Tensor:
    """Prompt ids `[B, n]` → `[B, n + new]` on `run` (see the module docstring). Rows that produced
    `eos_token_id` continue with `pad_token_id` (default: the eos id) and the loop stops once every row has;
    without an eos id no step waits on the device. No step runs after the last token is picked."""
    logits = run.prefill(input_ids, attention_mask)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
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
        logits = run(token[:, None])
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)
