"""Sparse prefill with a delta correction (`prefill_attention = "delta"`, docs/architecture.md §6.4; after Willette, Lee &
Hwang 2025, arXiv 2505.11254). This is the project's reading of the article's "Delta Attention".

In a multi-token forward (a prefill, or a chunk of one) every query attends only to the first `S` real
tokens (sinks) and the last `W` keys (a sliding window): `sparse_t`. Anchor queries (real positions
0, λ, 2λ, …), the last λ real positions and any query whose anchor lies in the cached prefix are also
computed densely. A query t in the block of anchor a (`a ≤ t < a + λ`) gets `sparse_t + (dense_a − sparse_a)`;
dense queries keep their dense output. Keys/values (and so the cache) are exact; single-token decoding is dense.

`prefill_attention = "window"` is the control: the sparse attention alone, no dense queries, no correction.

The forward falls back to plain dense attention (exactly) when the sparse pattern would see every key
(`S + W ≥` keys), when the chunk has at most λ tokens (all of them are "last λ"), for packed rows, and for
padding that is not left padding. The model skips it in training mode and in ATM layers (docs/delta.md).

Kernels: on CPU the sparse part runs SDPA over blocks of 64 queries, each with its sinks and a key slab of
`W + 63` keys (work ∝ T·(S + W), not T²); on CUDA it runs FlexAttention with a sink + window block mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .components_wiola import attend

BLOCK = 64  # queries per block of the CPU sparse kernel


def delta_prefill(q, k, v, key_real, real, cum_real, sink: int, window: int, stride: int, implementation: str = "sdpa",
                  kernel: str = "auto", correct: bool = True):
    """Delta-corrected sparse attention of q `[B,H,T,d]` over k/v `[B,H,P+T,d]` (already repeated to H heads;
    the first P keys are cached). `key_real` `[B,P+T]`, `real` `[B,T]` bool; `cum_real` `[B,T]` real tokens up to
    each query, cached ones included. Returns `[B,H,T,d]`, or None where this forward should run dense.
    `correct=False` returns the plain sinks + window attention (the control, `prefill_attention="window"`)."""
    t, total = q.shape[2], k.shape[2]
    past = total - t
    if (correct and t <= stride) or sink + window >= total:
        return None
    if key_real is None:
        key_real = torch.ones(q.shape[0], total, dtype=torch.bool, device=q.device)
    if not bool((key_real[:, 1:] >= key_real[:, :-1]).all()):  # pads after a real token: not left padding
        return None
    first = (~key_real).sum(dim=1)  # [B] index of the first real key (pads come first)
    if kernel == "auto":
        kernel = "flex" if q.device.type == "cuda" and implementation != "eager" else "blocks"
    if kernel == "flex":
        sparse = _sparse_flex(q, k, v, first, past, sink, window)
    else:
        sparse = _sparse_blocks(q, k, v, first, past, sink, window, implementation)
    if not correct:
        return sparse

    # the dense queries: anchors, queries whose anchor is cached (before this chunk), the last λ real positions
    b, h, _, d = q.shape
    pos = (cum_real - 1).clamp(min=0)  # real position of each query
    offset = pos % stride
    anchor_at = torch.arange(t, device=q.device)[None, :] - offset  # chunk index of each query's anchor
    last = pos > (cum_real[:, -1:] - 1) - stride
    dense = real & ((offset == 0) | (anchor_at < 0) | last)
    count = dense.sum(dim=1)
    width = int(count.max())
    idx = torch.sort((~dense).to(torch.int8), dim=1, stable=True).indices[:, :width]  # dense queries first
    valid = torch.arange(width, device=q.device)[None, :] < count[:, None]
    gather = idx[:, None, :, None].expand(b, h, width, d)
    key_idx = torch.arange(total, device=q.device)
    mask = (key_idx[None, None, :] <= (past + idx)[:, :, None]) & key_real[:, None, :]
    mask = (mask | ~valid[:, :, None])[:, None]  # unused rows see everything (no empty softmax); discarded below
    dense_out = attend(q.gather(2, gather), k, v, mask, False, implementation)
    dense_out = torch.where(valid[:, None, :, None], dense_out, sparse.gather(2, gather))
    exact = sparse.scatter(2, gather, dense_out)  # dense where computed, sparse elsewhere

    delta = exact - sparse  # zero except at dense queries
    use = real & (anchor_at >= 0)
    correction = delta.gather(2, anchor_at.clamp(min=0)[:, None, :, None].expand(b, h, t, d))
    out = sparse + correction * use[:, None, :, None].to(sparse.dtype)
    return torch.where(dense[:, None, :, None], exact, out)


def _sparse_blocks(q, k, v, first, past: int, sink: int, window: int, implementation: str):
    """Sinks + sliding window with SDPA over query blocks: block j sees the row's first `sink` real keys and
    the slab of `window + BLOCK − 1` keys ending at its last query."""
    b, h, t, d = q.shape
    total = k.shape[2]
    block = min(BLOCK, t)
    nb = -(-t // block)
    tq = nb * block
    slab = window + block - 1
    front = max(0, window - 1 - past)
    start = past - window + 1 + front  # padded index where block 0's slab begins

    def slabs(x):  # [B,H,S,d] -> [B,nb,H,slab,d]
        xp = F.pad(x, (0, 0, front, tq - t))[:, :, start:]
        return xp.unfold(2, slab, block)[:, :, :nb].permute(0, 2, 1, 4, 3)

    dev = q.device
    q_idx = past + torch.arange(tq, device=dev).view(nb, block)  # [nb, block]
    k_idx = past - window + 1 + torch.arange(nb, device=dev)[:, None] * block + torch.arange(slab, device=dev)[None, :]  # [nb, slab]
    qi, ki = q_idx[None, :, :, None], k_idx[None, :, None, :]
    f = first[:, None, None, None]
    win = (ki <= qi) & (ki > qi - window) & (ki >= f + sink) & (ki < total)
    win = win | ((qi < f) & (ki == qi)) | (qi >= past + t)  # a pad query sees itself; block padding sees all
    s_idx = first[:, None] + torch.arange(sink, device=dev)[None, :]  # [B, sink]
    sinks_ok = (s_idx[:, None, None, :] <= qi) & (s_idx < total)[:, None, None, :]
    s_gather = s_idx.clamp(max=total - 1)[:, None, :, None].expand(b, h, sink, d)
    k_s, v_s = k.gather(2, s_gather), v.gather(2, s_gather)
    keys = torch.cat([k_s[:, None].expand(b, nb, h, sink, d), slabs(k)], dim=3).reshape(b * nb, h, sink + slab, d)
    values = torch.cat([v_s[:, None].expand(b, nb, h, sink, d), slabs(v)], dim=3).reshape(b * nb, h, sink + slab, d)
    mask = torch.cat([sinks_ok, win.expand(b, nb, block, slab)], dim=3).reshape(b * nb, 1, block, sink + slab)
    qb = F.pad(q, (0, 0, 0, tq - t)).view(b, h, nb, block, d).transpose(1, 2).reshape(b * nb, h, block, d)
    out = attend(qb, keys, values, mask, False, implementation)
    return out.view(b, nb, h, block, d).transpose(1, 2).reshape(b, h, tq, d)[:, :, :t]


def _sparse_flex(q, k, v, first, past: int, sink: int, window: int):
    """Sinks + sliding window with FlexAttention (a block mask skips the blocks outside both)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from .merging_wiola import _flex_attention

    b, _, t, _ = q.shape
    total = k.shape[2]

    def mask_mod(batch, head, q_idx, kv_idx):
        qa, f = q_idx + past, first[batch]
        seen = (kv_idx <= qa) & (kv_idx >= f) & ((kv_idx < f + sink) | (qa - kv_idx < window))
        return seen | ((qa < f) & (kv_idx == qa))

    block_mask = create_block_mask(mask_mod, b, None, t, total, device=q.device)
    return _flex_attention(q, k, v, block_mask=block_mask)
