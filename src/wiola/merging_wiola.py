"""Causal Adaptive Token Merging (docs/architecture.md §2.3 "ATM"), usable in training and inference alike.

For an ATM layer, adjacent real tokens whose attention inputs have cosine similarity above τ are
paired greedily left to right without overlap (vectorised: inside a run of above-threshold edges every
other edge is taken, found with a cumulative sum). Only keys/values merge — a pair's key/value is the
mean of its two tokens' rotated keys/values and its *end* is the pair's second token; queries stay one
per token. Query t sees every group whose end ≤ t, plus its own raw key/value when t opens a pair that
ends at t+1. Nothing depends on a later token, so the layer is strictly causal.

The same function serves a full forward, chunked prefill and token-by-token decoding: the cache of an
ATM layer stores only the groups (`T' ≤ T` entries per row, compacted, pads never stored); when the first
new token pairs with the last cached (raw) token, that entry is replaced in place by the pair's mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .components_wiola import attend, repeat_kv


def take_edges(similarity_ok: torch.Tensor, prev_taken: torch.Tensor) -> torch.Tensor:
    """Greedy non-overlapping pairing without a loop over tokens.

    `similarity_ok[b, t]`: edge (t−1, t) qualifies (ρ > τ, both tokens real); `prev_taken[b]`: the edge
    into the token before this chunk was taken. Edge t is taken iff it qualifies and edge t−1 was not
    taken — inside a run of qualifying edges that is every other edge, counted from the run's start
    (a taken edge just before the chunk counts as the run's first). Returns a bool `[B, T]`.
    """
    e = torch.cat([prev_taken[:, None], similarity_ok], dim=1).long()
    c = e.cumsum(dim=1)
    # run_start[t] = c at the last e == 0 at or before t (0 before the first zero), i.e. the running maximum
    # of where(e == 0, c, 0), found without cummax (ONNX has no such op): zeros are numbered in order,
    # the k-th zero records its c in slot k, and every position reads the slot of its latest zero
    zero = e == 0
    latest = zero.long().cumsum(dim=1)
    recorded = c.new_zeros((c.shape[0], c.shape[1] + 1)).scatter(1, torch.where(zero, latest, 0), torch.where(zero, c, 0))
    run_start = recorded.gather(1, latest)
    return ((e == 1) & ((c - run_start) % 2 == 1))[:, 1:]


def merged_attention(q, k, v, x, real, threshold: float, n_rep: int, implementation: str, dropout: float = 0.0, cache=None, kernel: str = "mask",
                     doc_first=None):
    """ATM attention for one layer.

    q `[B,H,T,d]` (rotated, gated), k/v `[B,H_kv,T,d]` (k rotated), x `[B,T,D]` the layer's attention
    input, real `[B,T]` bool. `cache` is the layer's `WiolaCacheLayer` (or None) and is updated in place.
    `kernel="flex"` attends over the compacted groups with FlexAttention (work falls with T'); it serves
    forwards without cached groups and without attention dropout, else the explicit-mask path runs.
    `doc_first` `[B,T]` (a packed row, no cache: where each token's document starts) keeps pairs and
    visibility inside documents.
    Returns the attention output `[B,H,T,d]` and the joiner mask `[B,T]` (token t merged into its
    predecessor's group; its sum is the number of merged pairs).
    """
    if getattr(cache, "static", False):
        return _static_step(q, k, v, x, threshold, n_rep, implementation, cache)
    if getattr(cache, "fixed", False):
        return _fixed_chunk(q, k, v, x, real, threshold, n_rep, implementation, cache)
    b, _, t, d = k.shape
    device = k.device
    has_past = cache is not None and cache.lengths is not None
    if has_past:
        last_x, last_real, last_taken = cache.last_x, cache.last_real, cache.last_taken
    else:
        last_x = x.new_zeros(b, x.shape[-1])
        last_real = torch.zeros(b, dtype=torch.bool, device=device)
        last_taken = torch.zeros(b, dtype=torch.bool, device=device)

    # 1-2: similarities of adjacent real tokens and greedy pairing
    prev_x = torch.cat([last_x[:, None].to(x.dtype), x[:, :-1]], dim=1)
    prev_real = torch.cat([last_real[:, None], real[:, :-1]], dim=1)
    rho = F.cosine_similarity(prev_x.float(), x.float(), dim=-1)
    qualifies = (rho > threshold) & real & prev_real
    if doc_first is not None:  # never pair across a document start
        qualifies = qualifies & (doc_first != torch.arange(t, device=device)[None, :])
    joins = take_edges(qualifies, last_taken)  # token t joins t−1's group
    if cache is not None:
        cache.record_tokens(x, k, v, joins)  # per-token history, kept only when the cache records (crop)

    # 3: one slot per group starter; a starter followed by a joiner holds the pair's mean
    next_joins = torch.cat([joins[:, 1:], torch.zeros(b, 1, dtype=torch.bool, device=device)], dim=1)
    pair = next_joins[:, None, :, None]
    k_next = torch.cat([k[:, :, 1:], k[:, :, -1:]], dim=2)
    v_next = torch.cat([v[:, :, 1:], v[:, :, -1:]], dim=2)
    k_slot = torch.where(pair, (k + k_next) * 0.5, k)
    v_slot = torch.where(pair, (v + v_next) * 0.5, v)
    slot_valid = real & ~joins
    pos = torch.arange(t, device=device)
    slot_end = pos[None, :] + next_joins.long()

    flex_ok = q.device.type == "cuda" or not (torch.is_grad_enabled() and q.requires_grad)  # no flex backward on CPU
    if kernel == "flex" and flex_ok and not has_past and not dropout and implementation != "eager":
        out = _flex_groups(q, k, v, k_slot, v_slot, slot_valid, slot_end, next_joins | ~real, doc_first)
        if cache is not None:
            _store(cache, k_slot, v_slot, slot_valid, None, None, None)
            cache.last_x, cache.last_real, cache.last_taken = x[:, -1].detach(), real[:, -1], joins[:, -1]
        return out, joins & real

    # 4: visibility — cached groups (all past), new groups ended by t, own raw entry when t opens a pair
    slot_vis = slot_valid[:, None, :] & (slot_end[:, None, :] <= pos[None, :, None])
    if doc_first is not None:  # a group belongs to its starter's document
        slot_vis = slot_vis & (doc_first[:, None, :] == doc_first[:, :, None])
    raw_vis = (pos[None, :, None] == pos[None, None, :]) & (next_joins | ~real)[:, :, None]
    keys, values, vis = [k_slot, k], [v_slot, v], [slot_vis, raw_vis]
    if has_past:
        ck, cv, lengths = cache.keys, cache.values, cache.lengths
        # 5: the first new token pairs with the last cached entry -> replace that entry by the mean
        last = (torch.arange(ck.shape[2], device=device)[None, :] == (lengths - 1)[:, None]) & joins[:, :1]
        sel = last[:, None, :, None]
        ck = torch.where(sel, (ck + k[:, :, :1]) * 0.5, ck)
        cv = torch.where(sel, (cv + v[:, :, :1]) * 0.5, cv)
        cache_valid = torch.arange(ck.shape[2], device=device)[None, :] < lengths[:, None]
        keys, values = [ck] + keys, [cv] + values
        vis = [cache_valid[:, None, :].expand(b, t, -1)] + vis
    mask = torch.cat(vis, dim=2)[:, None]  # [B, 1, T, S]
    out = attend(q, repeat_kv(torch.cat(keys, dim=2), n_rep), repeat_kv(torch.cat(values, dim=2), n_rep), mask, False, implementation, dropout)

    if cache is not None:
        _store(cache, k_slot, v_slot, slot_valid, ck if has_past else None, cv if has_past else None, cache_valid if has_past else None)
        cache.last_x = x[:, -1].detach()
        cache.last_real = real[:, -1]
        cache.last_taken = joins[:, -1]
    return out, joins & real


def _token_slot(k, v, x, threshold: float, cache, real):
    """Where one token goes in an ATM layer's stored groups (`_static_step` and `_fixed_token`): whether it joins
    the last group `[B]` (similar enough to the previous token, which was real and did not itself join; `real`: the
    token is real, a `[B]` bool or True), the slot `[B, H_kv, 1, d]` it writes (`lengths − 1` when it joins, else
    `lengths`) and the keys/values it writes there (the pair's mean when it joins, else its own)."""
    b, h_kv, _, d = k.shape
    rho = F.cosine_similarity(cache.last_x[:, None].to(x.dtype).float(), x.float(), dim=-1)[:, 0]
    join = (rho > threshold) & real & cache.last_real & ~cache.last_taken
    slot = (cache.lengths - join.long())[:, None, None, None].expand(b, h_kv, 1, d)
    sel = join[:, None, None, None]
    return join, slot, torch.where(sel, (cache.keys.gather(2, slot) + k) * 0.5, k), torch.where(sel, (cache.values.gather(2, slot) + v) * 0.5, v)


def _static_step(q, k, v, x, threshold: float, n_rep: int, implementation: str, cache):
    """One decode step on a `WiolaStaticLayer` (one real token per row): the arithmetic of the cached
    path above for T = 1, written in place. The token joins the last group iff it is similar enough to the
    previous token, which was real and did not itself join; then slot `lengths − 1` becomes the pair's
    mean, else the token is written at slot `lengths`."""
    join, slot, new_k, new_v = _token_slot(k, v, x, threshold, cache, real=True)
    cache.keys.scatter_(2, slot, new_k)
    cache.values.scatter_(2, slot, new_v)
    cache.lengths.add_((~join).long())
    cache.last_x.copy_(x[:, -1])
    cache.last_real.fill_(True)
    cache.last_taken.copy_(join)
    visible = torch.arange(cache.keys.shape[2], device=k.device)[None, :] < cache.lengths[:, None]
    out = attend(q, repeat_kv(cache.keys, n_rep), repeat_kv(cache.values, n_rep), visible[:, None, None, :], False, implementation)
    return out, join[:, None]


def _fixed_chunk(q, k, v, x, real, threshold: float, n_rep: int, implementation: str, cache):
    """A chunk of any length on fixed-capacity state (the ONNX step of `wiola.export`): the arithmetic of the
    cached path of `merged_attention`, written without data-dependent shapes. `cache` holds keys/values
    `[B, H_kv, L, d]` (the first `lengths[b]` slots are the row's groups), `lengths`, `last_x`, `last_real`,
    `last_taken`; they are replaced by new tensors (nothing is written in place). Zero lengths and a false
    `last_real` are the empty state, which computes what the uncached path computes."""
    t = k.shape[2]
    if isinstance(t, int) and t == 1:  # one token (in the export: the step traced with a static chunk length of one)
        return _fixed_token(q, k, v, x, real, threshold, n_rep, implementation, cache)
    return _fixed_any(q, k, v, x, real, threshold, n_rep, implementation, cache)


def _fixed_any(q, k, v, x, real, threshold: float, n_rep: int, implementation: str, cache):
    """`_fixed_chunk` for a chunk of any length (the export's any-chunk body)."""
    b, h_kv, t, d = k.shape
    device = k.device
    prev_x = torch.cat([cache.last_x[:, None].to(x.dtype), x[:, :-1]], dim=1)
    prev_real = torch.cat([cache.last_real[:, None], real[:, :-1]], dim=1)
    rho = F.cosine_similarity(prev_x.float(), x.float(), dim=-1)
    joins = take_edges((rho > threshold) & real & prev_real, cache.last_taken)
    next_joins = torch.cat([joins[:, 1:], torch.zeros_like(joins[:, :1])], dim=1)
    pair = next_joins[:, None, :, None]
    k_slot = torch.where(pair, (k + torch.cat([k[:, :, 1:], k[:, :, -1:]], dim=2)) * 0.5, k)
    v_slot = torch.where(pair, (v + torch.cat([v[:, :, 1:], v[:, :, -1:]], dim=2)) * 0.5, v)
    slot_valid = real & ~joins
    pos = torch.arange(t, device=device)
    slot_end = pos[None, :] + next_joins.long()
    slot_vis = slot_valid[:, None, :] & (slot_end[:, None, :] <= pos[None, :, None])
    raw_vis = (pos[None, :, None] == pos[None, None, :]) & (next_joins | ~real)[:, :, None]
    lengths = cache.lengths
    slots = torch.arange(cache.keys.shape[2], device=device)
    sel = ((slots[None, :] == (lengths - 1)[:, None]) & joins[:, :1])[:, None, :, None]
    ck = torch.where(sel, (cache.keys + k[:, :, :1]) * 0.5, cache.keys)
    cv = torch.where(sel, (cache.values + v[:, :, :1]) * 0.5, cache.values)
    cache_vis = (slots[None, :] < lengths[:, None])[:, None, :].expand(-1, t, -1)
    mask = torch.cat([cache_vis, slot_vis, raw_vis], dim=2)[:, None]
    out = attend(q, repeat_kv(torch.cat([ck, k_slot, k], dim=2), n_rep), repeat_kv(torch.cat([cv, v_slot, v], dim=2), n_rep), mask, False, implementation)
    # store: the new groups go after the row's cached ones, in order (slots past the capacity are dropped)
    target = torch.where(slot_valid, lengths[:, None] + slot_valid.long().cumsum(dim=1) - 1, slots.shape[0] + pos[None, :])
    index = target[:, None, :, None].expand(-1, h_kv, -1, d)
    cache.keys = torch.cat([ck, torch.zeros_like(k_slot)], dim=2).scatter(2, index, k_slot)[:, :, : slots.shape[0]]
    cache.values = torch.cat([cv, torch.zeros_like(v_slot)], dim=2).scatter(2, index, v_slot)[:, :, : slots.shape[0]]
    cache.lengths = lengths + slot_valid.long().sum(dim=1)
    cache.last_x, cache.last_real, cache.last_taken = x[:, -1], real[:, -1], joins[:, -1]
    return out, joins & real


def _fixed_token(q, k, v, x, real, threshold: float, n_rep: int, implementation: str, cache):
    """`_fixed_chunk` for a chunk of one token, written for a graph traced at that length: the token is stored
    first (as `_static_step` stores it, without writing in place) and then attends over the stored groups, so no
    step concatenates the cache with the chunk. A real token joins the last group iff it is similar enough to the
    previous token, which was real and did not itself join (`take_edges` for one edge); it then replaces slot
    `lengths − 1` by the pair's mean, else it is written at slot `lengths` and counted. A padding token is
    written at slot `lengths` uncounted: this step alone sees it (its own raw entry), the next overwrites it."""
    real = real[:, 0]
    lengths = cache.lengths
    join, slot, new_k, new_v = _token_slot(k, v, x, threshold, cache, real)
    cache.keys = cache.keys.scatter(2, slot, new_k)
    cache.values = cache.values.scatter(2, slot, new_v)
    visible = torch.arange(cache.keys.shape[2], device=k.device)[None, :] < (lengths + (~join).long())[:, None]
    cache.lengths = lengths + (real & ~join).long()
    cache.last_x, cache.last_real, cache.last_taken = x[:, -1], real, join
    out = attend(q, repeat_kv(cache.keys, n_rep), repeat_kv(cache.values, n_rep), visible[:, None, None, :], False, implementation)
    return out, join[:, None]


def _store(cache, k_slot, v_slot, slot_valid, ck, cv, cache_valid) -> None:
    """Compact valid groups to the front of each row: cached groups first, then the new ones."""
    if ck is not None:
        k_all, v_all = torch.cat([ck, k_slot], dim=2), torch.cat([cv, v_slot], dim=2)
        valid = torch.cat([cache_valid, slot_valid], dim=1)
    else:
        k_all, v_all, valid = k_slot, v_slot, slot_valid
    if not cache.is_initialized:
        cache.lazy_initialization(k_slot, v_slot)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    lengths = valid.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    idx = order[:, :width][:, None, :, None].expand(-1, k_all.shape[1], -1, k_all.shape[3])
    cache.keys = torch.gather(k_all, 2, idx)
    cache.values = torch.gather(v_all, 2, idx)
    cache.lengths = lengths


_compiled_flex = None


def _flex_attention(q, k, v, **kwargs):
    """FlexAttention, compiled once on CUDA (its fast kernel) unless already inside a compiled model;
    eager elsewhere (a correct reference). Query, key and value go in with one dtype (under autocast they
    can differ, which FlexAttention refuses on torch 2.6); the output has the query's dtype."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not q.dtype == k.dtype == v.dtype:
        common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        result = _flex_attention(q.to(common), k.to(common), v.to(common), **kwargs)
        return (result[0].to(q.dtype), *result[1:]) if isinstance(result, tuple) else result.to(q.dtype)
    if q.device.type != "cuda" or torch.compiler.is_compiling():  # inside torch.compile: the outer graph compiles it
        return flex_attention(q, k, v, **kwargs)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, **kwargs)


def _flex_attention_lse(*args, **kwargs):
    """FlexAttention output and log-sum-exp (`return_aux` from torch 2.9 on, `return_lse` before)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # pragma: no cover - older torch
        return _flex_attention(*args, return_lse=True, **kwargs)
    out, aux = _flex_attention(*args, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


def _flex_groups(q, k, v, k_slot, v_slot, slot_valid, slot_end, use_own, doc_first=None):
    """Attention over the compacted groups (FlexAttention block mask from group ends), plus each
    query's own raw key/value where `use_own` (it opens a pair, or it is padding), merged exactly
    through the log-sum-exp of the group attention. With `doc_first` (a packed row), query t sees only the
    groups of its own document: groups never span documents and are sorted by end, so those are the range
    from the count of groups ended before the document's start up to the count ended by t."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, t, d = q.shape
    order = torch.sort((~slot_valid).to(torch.int8), dim=1, stable=True).indices
    idx = order[:, None, :, None].expand(-1, k_slot.shape[1], -1, d)
    k_groups, v_groups = torch.gather(k_slot, 2, idx), torch.gather(v_slot, 2, idx)
    # visible[b, t] = number of valid groups with end <= t; groups are sorted by end, so they form a prefix
    ends = torch.where(slot_valid, slot_end, torch.full_like(slot_end, t))
    visible = torch.zeros(b, t + 1, dtype=torch.long, device=q.device).scatter_add_(1, ends, torch.ones_like(ends))
    visible = visible[:, :t].cumsum(dim=1)

    if doc_first is None:
        lower = torch.zeros_like(visible)
    else:
        before = torch.cat([torch.zeros_like(visible[:, :1]), visible[:, :-1]], dim=1)  # groups ended by t - 1
        lower = before.gather(1, doc_first)

    def mask_mod(batch, head, q_idx, kv_idx):  # one definition: torch 2.6's dynamo cannot trace a choice of two
        return (kv_idx >= lower[batch, q_idx]) & (kv_idx < visible[batch, q_idx])

    block_mask = create_block_mask(mask_mod, b, None, t, t, device=q.device)
    out, lse = _flex_attention_lse(q, k_groups, v_groups, block_mask=block_mask, enable_gqa=k.shape[1] != h)
    own_k, own_v = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // k.shape[1])
    own = (q.float() * own_k.float()).sum(-1) * d**-0.5  # [B, H, T]
    own = torch.where(use_own[:, None, :], own, torch.full_like(own, float("-inf")))
    lse = lse.float()
    top = torch.maximum(lse, own)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w_groups, w_own = torch.exp(lse - top), torch.exp(own - top)
    total = w_groups + w_own
    mixed = (out.float() * w_groups[..., None] + own_v.float() * w_own[..., None]) / total[..., None]
    return mixed.to(q.dtype)
