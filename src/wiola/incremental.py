"""Exact incremental re-prefill (docs/architecture.md §6.4): bring a cache that holds one prompt to another prompt by
cropping it to their common prefix and prefilling only the rest.

    cache = WiolaCache(model.config, history="full")
    model(old_ids, cache=cache)                           # the first prompt
    out, reused = wiola.reprefill(model, cache, old_ids, new_ids)   # an edited prompt: only the tail runs

`out.logits` covers the new tokens after the reused prefix (`new_ids[:, reused:]`); the cache then equals a
fresh prefill of `new_ids`. A cache without full history can only be cropped where it records (see
`WiolaCache`), and a plain-LLaMA configuration (no running state) crops anywhere.
"""

from __future__ import annotations

import torch

from .cache_wiola import WiolaCache
from .compat_wiola import CACHE_KWARG


def common_prefix(old_ids: torch.Tensor, new_ids: torch.Tensor) -> int:
    """Columns `[0, n)` on which every row of `old_ids` and `new_ids` (`[B, T]` each) agree."""
    width = min(old_ids.shape[1], new_ids.shape[1])
    differ = (old_ids[:, :width] != new_ids[:, :width].to(old_ids.device)).any(dim=0)
    return int(differ.long().argmax()) if bool(differ.any()) else width


@torch.no_grad()
def reprefill(model, cache: WiolaCache, old_ids: torch.Tensor, new_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              old_attention_mask: torch.Tensor | None = None, **forward_kwargs):
    """Re-prefill `cache`, which holds exactly `old_ids`, for `new_ids`: crop it to the longest common prefix
    (at most `len(new_ids) − 1`, so that at least one token runs and the last logits come out) and run the
    model on the remaining tokens. `attention_mask` is the 2-D mask of `new_ids` (and `old_attention_mask`
    that of `old_ids`) when they are padded. Returns `(model output for new_ids[:, reused:], reused)`."""
    if not isinstance(cache, WiolaCache):
        raise ValueError(f"reprefill needs a WiolaCache, got {type(cache).__name__}")
    if old_ids.dim() != 2 or new_ids.dim() != 2 or old_ids.shape[0] != new_ids.shape[0]:
        raise ValueError(f"old_ids {tuple(old_ids.shape)} and new_ids {tuple(new_ids.shape)} must be [batch, tokens] with the same batch")
    if new_ids.shape[1] == 0:
        raise ValueError("new_ids is empty")
    if cache.get_seq_length() != old_ids.shape[1]:
        raise ValueError(f"the cache holds {cache.get_seq_length()} tokens but old_ids has {old_ids.shape[1]}")
    keep = common_prefix(old_ids, new_ids)
    if attention_mask is not None or old_attention_mask is not None:  # the padding must agree on the kept prefix too
        ones = torch.ones_like
        old_mask = old_attention_mask if old_attention_mask is not None else ones(old_ids)
        new_mask = attention_mask if attention_mask is not None else ones(new_ids)
        keep = min(keep, common_prefix(old_mask.long(), new_mask.long()))
    keep = min(keep, new_ids.shape[1] - 1)
    cache.crop(keep) if keep > 0 else cache.crop(-cache.get_seq_length())
    out = model(new_ids[:, keep:], attention_mask=attention_mask, use_cache=True, **{CACHE_KWARG: cache}, **forward_kwargs)
    return out, keep


__all__ = ["reprefill", "common_prefix"]
