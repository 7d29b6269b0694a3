"""`WiolaCache.crop`: after `crop(n)` the cache equals a fresh prefill of the first n tokens, for every component
(K/V, GSA and GCLA running sums, ATM groups including a merged pair cut in two), left padding included;
the history modes; and `wiola.reprefill` of an edited prompt against a prefill from scratch."""

from __future__ import annotations

import pytest
import torch

import wiola
from wiola import WiolaCache

from .conftest import COMBOS, build, combo_id, random_ids

ATM = dict(token_merging="atm", atm_threshold=-1.0)  # threshold −1: every other edge merges (pairs 0-1, 2-3, …)


def padded_batch(length: int = 14, pads: int = 3):
    ids = random_ids(2, length, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    ids[1, :pads] = 0
    return ids, mask


def fill(model, ids, mask, cache, chunks):
    """Run `ids` through `cache` in chunks (the last ones of length 1 are decode steps)."""
    at = 0
    for size in chunks:
        model(ids[:, at:at + size], attention_mask=mask[:, :at + size], cache=cache)
        at += size


def assert_rest_matches(model, ids, mask, cache, n, full):
    out = model(ids[:, n:], attention_mask=mask, cache=cache).logits
    real = mask[:, n:].bool()
    assert (out - full[:, n:])[real].abs().max() <= 1e-5


# every combination of the components that hold cache state (the MLP holds none: SwiGLU stands for all four)
FAMILY_OVERRIDES = {
    "llama": {}, "seed": dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly"),
    "paper": dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm", **ATM),
    "article": dict(position_encoding="srpe", cross_layer_context="gcla", mlp="f3n", f3n_gate="agu", f3n_levels=3, norm="hln", **ATM),
}
STATE_COMBOS = [c for c in COMBOS if c["mlp"] == "swiglu" or c["norm"] == "hln"]  # MLPs hold no cache state; HLN does


@torch.no_grad()
@pytest.mark.parametrize("combo", STATE_COMBOS, ids=combo_id)
def test_crop_then_prefill_equals_full_prefill(combo):
    """n = 5 and 9 cut a merged pair in row 0 (pairs end on odd positions) and not in the 3-pad row 1; n = 6,
    12 the other way round; 12 and 13 fall inside the decode steps."""
    model = build(**combo, **ATM)
    ids, mask = padded_batch()
    full = model(ids, attention_mask=mask).logits
    for n in (5, 6, 9, 12, 13):
        cache = WiolaCache(model.config, history="full")
        fill(model, ids, mask, cache, [4, 7, 1, 1, 1])
        cache.crop(n)
        fresh = WiolaCache(model.config)
        model(ids[:, :n], attention_mask=mask[:, :n], cache=fresh)
        assert cache.get_seq_length() == n and torch.equal(cache.real_count, fresh.real_count)
        for mine, theirs in zip(cache.layers, fresh.layers):
            assert mine.get_seq_length() == theirs.get_seq_length()
            if mine.merging:
                assert torch.equal(mine.lengths, theirs.lengths) and torch.equal(mine.last_taken, theirs.last_taken)
        assert_rest_matches(model, ids, mask, cache, n, full)


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_recent_history_crops_back_to_the_last_crop_only(family):
    overrides = FAMILY_OVERRIDES[family]
    model = build(**overrides)
    ids, mask = padded_batch()
    full = model(ids, attention_mask=mask).logits
    cache = WiolaCache(model.config)
    fill(model, ids, mask, cache, [8])
    cache.activate_past_recording()  # what assisted decoding calls
    assert cache.is_croppable
    model(ids[:, 8:11], attention_mask=mask[:, :11], cache=cache)
    model(ids[:, 11:12], attention_mask=mask[:, :12], cache=cache)
    cache.crop(-3)  # drop 9…11 (row 0: the crop cuts the pair 8-9)
    assert cache.get_seq_length() == 9
    if family != "llama":  # history now starts at 9: further back needs history="full"
        with pytest.raises(ValueError, match="history='full'"):
            cache.crop(5)
    else:  # plain K/V needs no history
        cache.crop(9)
    assert_rest_matches(model, ids, mask, cache, 9, full)


@torch.no_grad()
def test_no_history_by_default():
    model = build(attention_gate="gsa", **ATM)
    ids = random_ids(1, 9)
    cache = WiolaCache(model.config)
    model(ids, cache=cache)
    assert not cache.is_croppable and not cache.layers[0].history
    cache.crop(0)  # drops nothing (transformers' convention)
    with pytest.raises(ValueError, match="cropped back to 9 tokens at most"):
        cache.crop(-2)
    cache.crop(-9)  # an empty cache is always reachable
    assert cache.get_seq_length() == 0
    torch.testing.assert_close(model(ids, cache=cache).logits, model(ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="history='sometimes' is not valid"):
        WiolaCache(model.config, history="sometimes")


@torch.no_grad()
def test_beam_reorder_carries_the_history():
    model = build(attention_gate="gsa", cross_layer_context="gcla", **ATM)
    ids, mask = padded_batch()
    full = model(ids.flip(0), attention_mask=mask.flip(0)).logits
    cache = WiolaCache(model.config, history="full")
    fill(model, ids, mask, cache, [10, 1, 1])
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.crop(7)
    assert_rest_matches(model, ids.flip(0), mask.flip(0), cache, 7, full)


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_reprefill_of_an_edited_prompt_equals_a_fresh_prefill(family):
    overrides = FAMILY_OVERRIDES[family]
    model = build(**overrides)
    old = random_ids(1, 20, seed=1)
    cache = WiolaCache(model.config, history="full")
    model(old, cache=cache)
    cases = {"edit at 3": (3, 20), "edit at 11": (11, 22), "append": (None, 25), "same": (None, 20), "shorter": (None, 9)}
    for name, (at, length) in cases.items():
        new = torch.cat([old, random_ids(1, 10, seed=2)], dim=1)[:, :length].clone()
        if at is not None:
            new[0, at] = (new[0, at] + 5) % 58 + 3
        out, reused = wiola.reprefill(model, cache, old, new)
        same = 0
        while same < min(old.shape[1], new.shape[1]) and old[0, same] == new[0, same]:
            same += 1
        assert reused == min(same, new.shape[1] - 1), name
        scratch = model(new).logits
        assert (out.logits - scratch[:, reused:]).abs().max() <= 1e-5, name
        old = new  # the cache now holds `new`: edit it again


@torch.no_grad()
def test_reprefill_left_padded_batch_and_errors():
    model = build(attention_gate="gsa", **ATM)
    old, mask = padded_batch(12)
    cache = WiolaCache(model.config, history="full")
    model(old, attention_mask=mask, cache=cache)
    new = old.clone()
    new[:, 8] = 7
    out, reused = wiola.reprefill(model, cache, old, new, attention_mask=mask, old_attention_mask=mask)
    assert reused == 8
    assert (out.logits - model(new, attention_mask=mask).logits[:, 8:])[mask[:, 8:].bool()].abs().max() <= 1e-5
    with pytest.raises(ValueError, match="holds 12 tokens but old_ids has 5"):
        wiola.reprefill(model, cache, old[:, :5], new)
    plain = WiolaCache(model.config)
    model(old, attention_mask=mask, cache=plain)
    with pytest.raises(ValueError, match="history='full'"):
        wiola.reprefill(model, plain, old, new, attention_mask=mask, old_attention_mask=mask)
