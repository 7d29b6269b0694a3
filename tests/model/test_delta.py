"""Sparse prefill with delta correction (`prefill_attention="delta"`): the kernels against a per-query
reference, dense-exactness when the window covers everything, the ATM and training rules, and that it
composes with every family (causality, left-padding invariance, chunked prefill + cached decoding)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from wiola import WiolaCache, WiolaConfig
from wiola.delta_wiola import delta_prefill

from .conftest import build, random_ids

FAMILIES = {
    "llama": dict(),
    "seed": dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly"),
    "paper": dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm", token_merging="atm", atm_threshold=-1.0),
}
SMALL = dict(prefill_attention="delta", delta_sink=2, delta_window=5, delta_stride=4)  # sparse at T = 20


def reference(q, k, v, key_real, real, cum_real, sink, window, stride, correct=True):
    """Each query on its own: softmax over its visible keys, the anchor's correction added (or, for the
    uncorrected control, the sinks + window attention alone)."""
    b, h, t, d = q.shape
    total = k.shape[2]
    past = total - t
    out = torch.zeros_like(q)
    for r in range(b):
        key_pos = key_real[r].long().cumsum(0) - 1

        def attend(i, sparse):
            visible = key_real[r] & (torch.arange(total) <= past + i)
            if sparse:
                visible &= (key_pos < sink) | (cum_real[r, i] - 1 - key_pos < window)
            scores = torch.einsum("hd,hsd->hs", q[r, :, i], k[r]).masked_fill(~visible, float("-inf")) * d**-0.5
            return torch.einsum("hs,hsd->hd", scores.softmax(-1), v[r])

        last = int(cum_real[r, -1]) - 1
        for i in range(t):
            if real[r, i]:
                p = int(cum_real[r, i]) - 1
                anchor = i - p % stride
                if not correct:
                    out[r, :, i] = attend(i, True)
                elif p % stride == 0 or anchor < 0 or p > last - stride:
                    out[r, :, i] = attend(i, False)
                else:
                    out[r, :, i] = attend(i, True) + attend(anchor, False) - attend(anchor, True)
    return out


@pytest.mark.parametrize("kernel,implementation,correct", [("blocks", "sdpa", True), ("blocks", "eager", True), ("flex", "sdpa", True),
                                                           ("blocks", "sdpa", False)])
@pytest.mark.parametrize("past,t,sink,window,stride", [(0, 150, 4, 20, 16), (37, 100, 3, 30, 8), (5, 70, 0, 60, 7)])
def test_kernels_match_the_per_query_reference(kernel, implementation, correct, past, t, sink, window, stride):
    g = torch.Generator().manual_seed(past + t)
    b, h, d, total = 2, 3, 8, past + t
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (t, total, total))
    key_real = torch.ones(b, total, dtype=torch.bool)
    key_real[1, :11] = False  # a left-padded row
    real, cum_real = key_real[:, past:], key_real.long().cumsum(1)[:, past:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on CPU warns that it runs unfused
        out = delta_prefill(q, k, v, key_real, real, cum_real, sink, window, stride, implementation, kernel, correct)
    expected = reference(q, k, v, key_real, real, cum_real, sink, window, stride, correct)
    assert (out - expected)[real[:, None, :, None].expand_as(out)].abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_window_covering_the_prompt_equals_dense_exactly(family):
    dense = build(**FAMILIES[family])
    ids = random_ids(2, 20)
    for window in (20, 18, 64):  # S + W >= T: the sparse pattern sees every key
        delta = build(**FAMILIES[family], prefill_attention="delta", delta_sink=2, delta_window=window, delta_stride=4)
        assert torch.equal(delta(ids).logits, dense(ids).logits)
    approx = build(**FAMILIES[family], **SMALL)(ids).logits  # W < T: approximate from the first block on
    assert not torch.allclose(approx, dense(ids).logits, atol=1e-4)


@torch.no_grad()
def test_atm_layers_and_training_mode_stay_dense():
    every_layer = dict(token_merging="atm", atm_threshold=-1.0, atm_layers=list(range(6)))
    ids = random_ids(1, 20)
    assert torch.equal(build(**every_layer, **SMALL)(ids).logits, build(**every_layer)(ids).logits)
    model, dense = build(**SMALL).train(), build().train()
    assert torch.equal(model(ids).logits, dense(ids).logits)


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_delta_composes_causality_padding_and_cache(family):
    model = build(**FAMILIES[family], **SMALL)
    ids = random_ids(1, 20)
    base = model(ids).logits
    for t in (6, 17):  # strict causality in eval mode
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 7) % 58 + 3
        torch.testing.assert_close(model(changed).logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
    # a left-padded row gives the logits of the row alone (positions, sinks and anchors count real tokens)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 5:], base, atol=1e-5, rtol=0)
    # chunked prefill (the second chunk's first queries have their anchor in the cache: dense), then decoding
    cache = WiolaCache(model.config)
    first = model(ids[:, :13], cache=cache).logits
    model(ids[:, 13:], cache=cache)
    torch.testing.assert_close(first, model(ids[:, :13]).logits, atol=0, rtol=0)
    # a decode step after the sparse prefill is dense: the dense model (same weights) from the same cache agrees
    dense = build(**FAMILIES[family])
    token = random_ids(1, 1, seed=9)
    twin = copy.deepcopy(cache)
    assert torch.equal(model(token, cache=cache).logits, dense(token, cache=twin).logits)


def test_window_control_and_config_checks():
    ids = random_ids(1, 20)
    with torch.no_grad():
        delta = build(**SMALL)(ids).logits
        window = build(**dict(SMALL, prefill_attention="window"))(ids).logits
    assert not torch.allclose(delta, window, atol=1e-4)
    with pytest.raises(ValueError, match="prefill_attention='sparse' is not valid; choose one of: dense, delta, window"):
        WiolaConfig(prefill_attention="sparse")
    with pytest.raises(ValueError, match="delta_window must be an integer >= 1"):
        WiolaConfig(delta_window=0)
